"""Zero-copy tensor reads for the converters: each stored tensor is a view on a private (copy-on-write)
mmap of its shard, located from the shard header, so copying a tensor to an output shard never
materialises it in anonymous memory and nothing can write to the input. A few shard maps stay open
(least recently used first out); a map is unmapped once the last view on it is gone. Maps are read
sequentially (``MADV_SEQUENTIAL``) and each tensor's pages are requested ahead as it is handed out
(``MADV_WILLNEED``), so a cold shard streams from disk with large reads instead of page-by-page faults.
A consumer that is done with a tensor can ``release`` it (``MADV_DONTNEED``): its pages leave the
process's resident set (they stay in the page cache), so resident memory holds the tensors in use, not
the whole of the open shards.

``write_shard_streaming`` writes one output shard exactly as ``dsv3tools.checkpoint.writer.write_shard`` does (same
bytes, same temporary name; the executor makes it durable and renames it) but faster for conversions:
byte-copied tensors go file to file in the kernel (``copy_file_range`` as ``cp`` does, ``sendfile`` across file
systems), produced tensors are written with one ``pwrite`` each from an I/O thread while the next tensor is
computed (its source read ahead), and writeback of every written range starts at once
(``sync_file_range``), so the disk works during the computation instead of all at the final flush."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dsv3tools.checkpoint.fsutil import start_writeback
from dsv3tools.checkpoint.reader import TensorInfo
from dsv3tools.checkpoint.writer import (
    ST_DTYPES,
    TORCH_DTYPES,
    OutSpec,
    ShardPlan,
    header_bytes,
    tensor_bytes,
    tmp_path,
)
from dsv3tools.errors import DSV3Error

Location = tuple[Path, int, int]  # source file, byte offset, byte count


def _advise(mm: mmap.mmap, option: int | None, start: int, length: int) -> None:
    """``madvise`` on the pages covering ``[start, start + length)``; a hint only (ignored where unsupported)."""
    if option is None or length <= 0:
        return
    page_start = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError, AttributeError):
        mm.madvise(option, page_start, min(len(mm), start + length) - page_start)


class ShardReader:
    """Read tensors of one checkpoint folder by their header facts (``TensorInfo``)."""

    def __init__(self, folder: Path, infos: dict[str, TensorInfo], keep_open: int = 2):
        self.folder = Path(folder)
        self.infos = infos
        self.keep_open = keep_open
        self._maps: OrderedDict[str, tuple[mmap.mmap, int]] = OrderedDict()

    def _map(self, shard: str) -> tuple[mmap.mmap, int]:
        hit = self._maps.get(shard)
        if hit is not None:
            self._maps.move_to_end(shard)
            return hit
        path = self.folder / shard
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, struct.error, ValueError) as e:
            raise DSV3Error(f"{path}: cannot read ({e}); re-download it") from None
        self._maps[shard] = (mm, 8 + n)
        while len(self._maps) > self.keep_open:
            self._maps.popitem(last=False)  # unmapped when the last tensor view on it is released
        return mm, 8 + n

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` as a view on the mapped shard (no copy)."""
        info = self.infos[name]
        mm, base = self._map(info.shard)
        a, b = info.offsets
        if base + b > len(mm):
            raise DSV3Error(f"{self.folder / info.shard}: truncated at tensor {name}; re-download it")
        dtype = TORCH_DTYPES[info.dtype]
        if b == a:
            return torch.empty(info.shape, dtype=dtype)
        _advise(mm, getattr(mmap, "MADV_WILLNEED", None), base + a, b - a)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=b - a, offset=base + a)
        return raw.view(dtype).view(info.shape)

    def prefetch(self, name: str) -> None:
        """Start reading the pages of ``name`` from disk now (asynchronous readahead) so that a later
        :meth:`get` finds them in the page cache; a hint only."""
        info = self.infos.get(name)
        if info is None or info.nbytes == 0:
            return
        mm, base = self._map(info.shard)
        _advise(mm, getattr(mmap, "MADV_WILLNEED", None), base + info.offsets[0], info.nbytes)

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from this process's mapping (a hint; a later read re-faults them from
        the page cache or the file, so releasing a tensor that is still read is slow, never wrong: the
        private map is never written)."""
        info = self.infos.get(name)
        hit = self._maps.get(info.shard) if info is not None else None
        if hit is None or info.nbytes == 0:
            return
        mm, base = hit
        _advise(mm, getattr(mmap, "MADV_DONTNEED", None), base + info.offsets[0], info.nbytes)

    def locate(self, name: str) -> Location:
        """Where the bytes of ``name`` lie: (shard file, absolute offset, byte count)."""
        info = self.infos[name]
        path = self.folder / info.shard
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        return path, 8 + n + info.offsets[0], info.nbytes

    def close(self) -> None:
        self._maps.clear()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def copy_range(src: Location, fd: int, offset: int) -> None:
    """Copy the bytes at ``src`` into ``fd`` at ``offset`` in the kernel: ``copy_file_range`` within one file
    system (what ``cp`` does), ``sendfile`` across file systems (page cache to page cache, 2.5-3.5x faster
    than reads and writes through a buffer), plain reads and writes where neither exists."""
    path, pos, left = src
    failed: list[Exception] = []
    with open(path, "rb") as f:
        for step in (_copy_file_range, _sendfile, _read_write):
            try:
                pos, offset, left = step(f.fileno(), fd, pos, offset, left)
            except (OSError, AttributeError) as e:  # EXDEV across file systems, ENOSYS, EINVAL: next method
                failed.append(e)
                continue
            if not left:
                return
            # stopped short: end of file, or a method that copies nothing here; the next one tells
    if len(failed) == 3:
        raise DSV3Error(f"{path}: cannot be read ({failed[-1]}); re-download it")
    raise DSV3Error(f"{path}: truncated; re-download it")


def _copy_file_range(src: int, fd: int, pos: int, offset: int, left: int) -> tuple[int, int, int]:
    while left > 0:
        n = os.copy_file_range(src, fd, min(left, 1 << 30), pos, offset)
        if n == 0:
            break
        pos, offset, left = pos + n, offset + n, left - n
    return pos, offset, left


def _sendfile(src: int, fd: int, pos: int, offset: int, left: int) -> tuple[int, int, int]:
    """``sendfile`` writes at the file position of ``fd``: only the writer's one I/O thread moves it."""
    os.lseek(fd, offset, os.SEEK_SET)
    while left > 0:
        n = os.sendfile(fd, src, pos, min(left, 1 << 30))
        if n == 0:
            break
        pos, offset, left = pos + n, offset + n, left - n
    return pos, offset, left


def _read_write(src: int, fd: int, pos: int, offset: int, left: int) -> tuple[int, int, int]:
    buf = memoryview(bytearray(min(left, 64 << 20)))
    while left > 0:
        n = os.preadv(src, [buf[: min(left, len(buf))]], pos)
        if n == 0:
            break
        pwrite_all(fd, buf[:n], offset)
        pos, offset, left = pos + n, offset + n, left - n
    return pos, offset, left


def _write_tensor(fd: int, pos: int, nbytes: int, src: Location | None, data: memoryview | None) -> None:
    if src is not None:
        copy_range(src, fd, pos)
    else:
        assert data is not None
        pwrite_all(fd, data, pos)
    start_writeback(fd, pos, nbytes)


def write_shard_streaming(
    path: Path,
    plan: ShardPlan,
    produce: Callable[[OutSpec], torch.Tensor],
    locate: Callable[[OutSpec], Location | None],
    metadata: dict[str, str] | None = None,
    prefetch: Callable[[OutSpec], None] | None = None,
) -> int:
    """``writer.write_shard`` byte for byte; ``locate(spec)`` names a source range for byte copies;
    ``prefetch(spec)`` is called for the next tensor before the current one is produced (readahead).

    One I/O thread writes tensor k while tensor k+1 is produced: at most one write is in flight, so a
    producer that alternates between two output buffers never overwrites bytes still being written.
    """
    head, offsets = header_bytes(plan.tensors, metadata)
    fd = os.open(tmp_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(1) as io:
            pwrite_all(fd, memoryview(head), 0)
            pending = None
            for i, (spec, off) in enumerate(zip(plan.tensors, offsets, strict=True)):
                if prefetch is not None and i + 1 < len(plan.tensors):
                    prefetch(plan.tensors[i + 1])
                src, data = locate(spec), None
                if src is None or src[2] != spec.nbytes:
                    src, t = None, produce(spec)
                    if ST_DTYPES.get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                        raise RuntimeError(
                            f"{spec.name}: produced {t.dtype} {list(t.shape)}, planned {spec.dtype} {list(spec.shape)}"
                        )
                    data = tensor_bytes(t)
                if pending is not None:
                    pending.result()
                pending = io.submit(_write_tensor, fd, len(head) + off, spec.nbytes, src, data)
            if pending is not None:
                pending.result()
        total = len(head) + plan.nbytes
        os.ftruncate(fd, total)
    finally:
        os.close(fd)
    return total
