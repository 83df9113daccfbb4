"""Small filesystem helpers without heavy imports: atomic writes (temp name, fsync, rename) and free space."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def free_bytes(path: Path) -> int:
    """Free bytes at ``path``; env DSV3TOOLS_FAKE_FREE_BYTES overrides it (a test hook)."""
    fake = os.environ.get("DSV3TOOLS_FAKE_FREE_BYTES")
    return int(fake) if fake else shutil.disk_usage(path).free
