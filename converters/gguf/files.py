"""Where a GGUF model's files are, from names alone (nothing is parsed here, and ``gguf`` is not imported):
whether a path is a GGUF model (a ``.gguf`` file, or a folder without a config.json holding exactly one GGUF
model), which file it starts with, and the gguf-split shards that follow a first
``<name>-00001-of-0000N.gguf`` (llama.cpp's gguf-split naming, which ``convert --to gguf
--gguf-split-max-size`` writes)."""

from __future__ import annotations

import re
from pathlib import Path

from dsv3tools.errors import DSV3Error

SUFFIX = ".gguf"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf(path: str | Path) -> bool:
    """True for a path ending in ``.gguf`` or a folder (no config.json) that holds ``.gguf`` files."""
    p = Path(path)
    if p.suffix.lower() == SUFFIX:
        return True
    return p.is_dir() and not (p / "config.json").exists() and any(_gguf_files(p))


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == SUFFIX and f.is_file())


def models_in(folder: Path) -> list[Path]:
    """The first file of every GGUF model in ``folder``: single files and the ``-00001-of-N`` of splits."""
    out = []
    for f in _gguf_files(folder):
        m = SPLIT_RE.match(f.name)
        if m is None or int(m.group("no")) == 1:
            out.append(f)
    return out


def model_file(path: str | Path) -> Path:
    """The file a GGUF model starts with; errors name the path and say what to point at."""
    p = Path(path)
    if p.is_dir():
        found = models_in(p)
        if len(found) != 1:
            names = ", ".join(f.name for f in found[:4]) or "none"
            raise DSV3Error(f"{p}: holds {len(found)} GGUF models ({names}); point --model at one .gguf file")
        p = found[0]
    if not p.is_file():
        raise DSV3Error(f"{p}: no such GGUF file; point --model at a .gguf file or its folder")
    m = SPLIT_RE.match(p.name)
    if m is not None and int(m.group("no")) != 1:
        first = f"{m.group('stem')}-00001-of-{m.group('count')}.gguf"
        raise DSV3Error(f"{p}: split {int(m.group('no'))} of a gguf-split model; point --model at {first}")
    return p


def split_files(first: Path) -> list[Path]:
    """``[first]``, or every shard of a gguf-split model in order (a missing shard is an error naming it)."""
    m = SPLIT_RE.match(first.name)
    if m is None:
        return [first]
    count = int(m.group("count"))
    files = [first.with_name(f"{m.group('stem')}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    for k, f in enumerate(files, 1):
        if not f.is_file():
            raise DSV3Error(
                f"{f}: missing (split {k} of {count} of {first.name}); copy every split into {first.parent}"
            )
    return files
