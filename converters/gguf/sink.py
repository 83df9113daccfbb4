"""Where the exporter's encoded bytes go: the data region of a GGUF file, written in file order, and the
buffers the encoders write into.

:class:`DirectSink` writes with ``O_DIRECT``: the bytes go from the encoders' buffers to the disk without a
copy into the page cache (that copy was a tenth of the export's CPU time) and without a backlog of dirty pages
left for the final fsync. ``O_DIRECT`` wants file offsets, lengths and memory addresses that are multiples of
the device's block size (:data:`ALIGN`, 4 KiB, covers the common ones). :class:`Buffers` gives each piece a
buffer whose address is congruent to the piece's file offset modulo :data:`ALIGN`, so the whole blocks inside
a piece are written straight from it; the bytes at each end that share a block with the previous or next
piece (or with the header, or a tensor's padding) are gathered in a block-sized bounce buffer, written when
full. The last block is written whole and the file truncated to its length. Writes run on a thread of their
own, in order, a bounded number queued.

:class:`PageCacheSink` is the fallback where the file system refuses ``O_DIRECT`` (tmpfs, some network file
systems): buffered writes, each piece's writeback started at once (``sync_file_range``) from another thread."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dsv3tools.checkpoint.fsutil import start_writeback

ALIGN = 4096
QUEUED = 8  # O_DIRECT writes in flight before the caller waits for the oldest
Done = Callable[[], None]


class Buffers:
    """Output buffers, each handed back once its bytes are written and reused by later pieces (a fresh
    multi-MB buffer per piece costs a page fault per 4 KB); at most ``keep`` are kept."""

    MIN_BYTES = (16 << 20) + ALIGN  # an expert's Q8_0 bytes at the real shape: most pieces fit one buffer

    def __init__(self, keep: int):
        self.free: deque[torch.Tensor] = deque()
        self.keep, self.lock = keep, threading.Lock()

    def take(self, n: int, offset: int = 0) -> torch.Tensor:
        """``n`` bytes whose address is congruent to ``offset`` modulo :data:`ALIGN`."""
        buf = None
        with self.lock:
            for _ in range(len(self.free)):
                cand = self.free.popleft()
                if cand.numel() >= n + ALIGN:
                    buf = cand
                    break
                self.free.append(cand)
        if buf is None:
            buf = torch.empty(max(n + ALIGN, self.MIN_BYTES), dtype=torch.uint8)
        skip = (offset - buf.data_ptr()) % ALIGN
        return buf[skip : skip + n]

    def give(self, view: torch.Tensor) -> None:
        with self.lock:
            if len(self.free) < self.keep:
                self.free.append(view if view._base is None else view._base)


def open_direct(path: Path) -> int | None:
    """A write descriptor with ``O_DIRECT`` on ``path``, or None where the system or file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _pwrite(fd: int, data: torch.Tensor, offset: int, done: Done | None = None) -> None:
    view = memoryview(data.numpy())
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    if done is not None:
        done()


class DirectSink:
    """Appends to ``path`` from its current end (the header, metadata and tensor infos, already written and
    synced through the buffered file) with ``O_DIRECT`` writes on ``fd``."""

    def __init__(self, path: Path, fd: int):
        self.fd, self.pos = fd, path.stat().st_size
        self.block_start = self.pos - self.pos % ALIGN
        self.block, self.fill = self._new_block(), self.pos - self.block_start
        with open(path, "rb") as f:  # the header's bytes in the first data block
            f.seek(self.block_start)
            head = bytearray(f.read(self.fill))
        if head:
            self.block[: self.fill].copy_(torch.frombuffer(head, dtype=torch.uint8))
        self.io = ThreadPoolExecutor(1)
        self.queued: deque[Future] = deque()

    @staticmethod
    def _new_block() -> torch.Tensor:
        raw = torch.zeros(2 * ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % ALIGN
        return raw[skip : skip + ALIGN]

    def _submit(self, data: torch.Tensor, offset: int, done: Done | None = None) -> None:
        self.queued.append(self.io.submit(_pwrite, self.fd, data, offset, done))
        while len(self.queued) > QUEUED:
            self.queued.popleft().result()

    def _gather(self, data: torch.Tensor) -> None:
        """Append bytes through the bounce block, writing it whenever it fills."""
        while data.numel():
            n = min(data.numel(), ALIGN - self.fill)
            self.block[self.fill : self.fill + n].copy_(data[:n])
            self.fill, self.pos, data = self.fill + n, self.pos + n, data[n:]
            if self.fill == ALIGN:
                self._submit(self.block, self.block_start)
                self.block, self.block_start, self.fill = self._new_block(), self.block_start + ALIGN, 0

    def write(self, data: torch.Tensor, done: Done | None = None) -> None:
        """Append ``data`` (uint8). Whole blocks go straight from it when its address is congruent to the
        current offset modulo :data:`ALIGN` (else everything is copied through the bounce block); ``done()``
        runs once the buffer is no longer needed."""
        head = min(data.numel(), -self.pos % ALIGN)
        whole = (data.numel() - head) // ALIGN * ALIGN
        if (data.data_ptr() - self.pos) % ALIGN or not whole:
            self._gather(data)
            if done is not None:
                done()
            return
        self._gather(data[:head])
        self._submit(data[head : head + whole], self.pos, done)
        self.pos += whole
        self.block_start = self.pos
        self._gather(data[head + whole :])

    def close(self) -> None:
        """Write the last partial block (whole, the file then truncated to its length) and wait for every
        write."""
        try:
            if self.fill:
                self.block[self.fill :].zero_()
                self._submit(self.block, self.block_start)
            while self.queued:
                self.queued.popleft().result()
        finally:
            self.io.shutdown(wait=True)
        os.ftruncate(self.fd, self.pos)
        os.fsync(self.fd)


class PageCacheSink:
    """Appends to the buffered file ``fout``; each write's writeback to disk starts at once, from a thread
    of its own (so a busy disk does not hold up the caller)."""

    def __init__(self, fout):
        self.fout, self.io = fout, ThreadPoolExecutor(1)
        fout.flush()

    def write(self, data: torch.Tensor, done: Done | None = None) -> None:
        pos = self.fout.tell()
        self.fout.write(memoryview(data.numpy()))  # larger than the buffer: written through at once
        self.fout.flush()
        self.io.submit(start_writeback, self.fout.fileno(), pos, data.numel())
        if done is not None:
            done()  # its bytes are in the page cache now: the buffer can be reused

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.fout.flush()
        os.fsync(self.fout.fileno())
