"""Where the GGUF exporter's float32 values come from, and what it reads when.

:class:`MappedShards` gives each stored tensor as a view on a private map of its shard (nothing is read until
used) and advises the kernel by row range: read ahead (``POSIX_FADV_WILLNEED``) before a piece is encoded,
drop from this process (``MADV_DONTNEED``; the pages stay in the page cache) once it is, so resident memory
holds the pieces in flight, not the tensors read so far.

A :class:`Piece` is one unit of output: a band of rows of a 2-D weight, one expert of a stacked expert
tensor, or a whole small tensor, as float32 rows of its GGUF row length. It yields its rows in slabs of
``step`` rows (up to 4 MB of float32, written into a per-thread scratch buffer, so each slab is dequantized
and encoded while it is in the CPU's cache, and FP8's per-block tables are built once per block row); for
FP8 a slab never straddles a 128-row scale block."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dsv3tools.checkpoint.reader import Checkpoint, MappedShard, map_shard, tensor_view
from dsv3tools.quant.bands import SourceWeight

SLAB_ELEMENTS = 1 << 20  # float32 values per slab (4 MB): 128 rows of 7168, one FP8 scale block row
Rows = Callable[[int, int, torch.Tensor], torch.Tensor]
Range = tuple[str, int, int]  # stored tensor, first row, end row


class MappedShards:
    """The checkpoint's stored tensors as views on private (copy-on-write) maps, one per shard, and the
    kernel told by row range what to read ahead and what this process is done with."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.maps: dict[str, MappedShard] = {}
        self.fds: dict[str, int] = {}

    def _mapped(self, name: str) -> tuple[str, MappedShard, int, int, int]:
        """(shard, map, byte offset of the tensor in the file, its bytes, bytes per first-dimension row)."""
        info = self.ck.info(name)
        mapped = self.maps.get(info.shard)
        if mapped is None:
            mapped = self.maps[info.shard] = map_shard(self.ck.path / info.shard)
        a, b = info.offsets
        rows = info.shape[0] if len(info.shape) >= 2 else 1
        return info.shard, mapped, mapped[1] + a, b - a, (b - a) // max(rows, 1)

    def get(self, name: str) -> torch.Tensor:
        _, mapped, *_ = self._mapped(name)
        return tensor_view(mapped, self.ck.info(name))

    def _spans(self, ranges: list[Range]) -> Iterator[tuple[str, MappedShard, int, int]]:
        """(shard, map, first byte, end byte) of each range, the start rounded down to a page."""
        for name, r0, r1 in ranges:
            shard, mapped, start, nbytes, row = self._mapped(name)
            lo, hi = start + min(r0 * row, nbytes), start + min(r1 * row, nbytes)
            lo -= lo % mmap.PAGESIZE
            if hi > lo:
                yield shard, mapped, lo, hi

    def nbytes(self, ranges: list[Range]) -> int:
        return sum(hi - lo for *_, lo, hi in self._spans(ranges))

    def prefetch(self, ranges: list[Range]) -> None:
        """Start reading the ranges into the page cache (``POSIX_FADV_WILLNEED``: the GIL is released while
        the request waits on a busy disk, which ``madvise`` does not do); a hint only."""
        for shard, _, lo, hi in self._spans(ranges):
            fd = self.fds.get(shard)
            if fd is None:
                fd = self.fds[shard] = os.open(self.ck.path / shard, os.O_RDONLY)
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)

    def release(self, ranges: list[Range]) -> None:
        """Drop the ranges' pages from this process (``MADV_DONTNEED``; they stay in the page cache, and a
        later read faults them back in, so releasing early is slow, never wrong); a hint only."""
        option = getattr(mmap, "MADV_DONTNEED", None)
        for _, (mm, _), lo, hi in self._spans(ranges):
            if option is not None:
                with contextlib.suppress(OSError, ValueError):
                    mm.madvise(option, lo, hi - lo)

    def close(self) -> None:
        self.maps.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclass
class Piece:
    """Rows of one output tensor: ``shape`` (rows, row length), ``rows(r0, r1, scratch)`` gives rows ``r0:r1``
    as float32 (in ``scratch`` where it can), ``step`` rows at a time, reading ``ranges``."""

    shape: tuple[int, int]
    rows: Rows
    step: int
    ranges: list[Range] = field(default_factory=list)


def slab_rows(cols: int, block_rows: int = 0) -> int:
    """Rows per slab for rows of ``cols`` values: about :data:`SLAB_ELEMENTS`, a power of two, dividing
    ``block_rows`` when given (an FP8 scale block's height)."""
    step = 1
    while step * 2 * cols <= SLAB_ELEMENTS:
        step *= 2
    while block_rows and block_rows % step:
        step //= 2
    return step


def weight_rows(src: SourceWeight, r0: int, r1: int) -> Piece:
    """Rows ``r0:r1`` of a stored linear (any format) as a piece (``r0`` on a scale block row for FP8)."""
    cols = src.shape[1]
    block = src.block[0] if src.fmt == "fp8" else 0

    def rows(a: int, b: int, scratch: torch.Tensor) -> torch.Tensor:
        return src.band(r0 + a, r0 + b, scratch)

    name = f"{src.prefix}.weight" if src.fmt in ("fp8", "bf16", "fp16") else f"{src.prefix}.weight_packed"
    return Piece((r1 - r0, cols), rows, slab_rows(cols, block), [(name, r0, r1)])


def tensor_rows(t: torch.Tensor, name: str, r0: int, r1: int) -> Piece:
    """Rows ``r0:r1`` of a stored tensor (bf16, f16 or f32; 1-D as one row) as a piece."""
    t2 = t.view(1, -1) if t.dim() < 2 else t.view(t.shape[0], -1)
    cols = t2.shape[1]

    def rows(a: int, b: int, scratch: torch.Tensor) -> torch.Tensor:
        part = t2[r0 + a : r0 + b]
        if part.dtype == torch.float32:
            return part
        return scratch.view(-1)[: part.numel()].view(part.shape).copy_(part)

    n = r1 - r0 if t.dim() >= 2 else 1
    return Piece((n, cols), rows, slab_rows(cols), [(name, r0, r1)])


def computed(shape: tuple[int, int], make: Callable[[], torch.Tensor], ranges: list[Range]) -> Piece:
    """A piece whose float32 values ``make()`` computes in full, once, when first read (a small tensor or
    a reshaped one such as ``kv_b_proj``'s per-head halves); ``make()`` returns ``shape`` rows."""
    held: list[torch.Tensor] = []

    def rows(a: int, b: int, scratch: torch.Tensor) -> torch.Tensor:
        if not held:
            held.append(make().reshape(shape))
        return held[0][a:b]

    return Piece(shape, rows, slab_rows(shape[1]), ranges)
