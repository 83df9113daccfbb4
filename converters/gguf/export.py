"""``convert --to gguf``: one streaming pass from any stored format (fp8 blocks, bf16, int4, fp4) to a GGUF
file, or gguf-split files, in bounded memory.

Tensors go into files by gguf's own split rule (``GGUFWriter.add_tensor_info``: a file takes tensors until
the next would take its data past ``--gguf-split-max-size``) and the files are named as llama.cpp's
gguf-split names them (``<stem>-00001-of-0000N.gguf``); the first holds all the metadata, each holds the
three ``split.*`` keys. Each file is one ``GGUFWriter``: every tensor declared (``add_tensor_info``), the
header, metadata and tensor infos written, then the data tensor by tensor. A tensor's values are produced
in pieces (``source.py``): row bands of a 2-D weight, one expert at a time of a stacked expert tensor (never
the whole stack), each dequantized to float32 from the memory-mapped source a cache-sized slab at a time
(FP8 through ``dsv3tools.quant.fp8_lut``'s tables) and encoded by ``encode.py``'s torch encoders, which write
exactly the bytes of ``gguf.quants.quantize`` (the encoder llama.cpp's converter uses) for the same float32
values. ``workers`` threads (one torch thread each) encode pieces a bounded distance ahead; the main thread
hands them in file order to ``sink.py``, which writes the data region with ``O_DIRECT`` (no page-cache copy;
buffered writes where the file system refuses it). The sources of the pieces to come are read ahead (up to
1 GiB, into the page cache) and each is dropped from the process once encoded, so resident memory is the
pieces in flight whatever the checkpoint's size or expert count.

Each file is written under ``OUT/.gguf-partial/``, fsynced, and renamed into ``OUT`` when complete, so an
interrupted run leaves nothing under a final name. A re-run keeps every file already under its final name
whose tensors are the ones planned for it (a resumed split export starts at the first missing file) and
writes the rest."""

from __future__ import annotations

import functools
import math
import mmap
import os
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from dsv3tools.checkpoint.fsutil import atomic_copy, atomic_write_json, fsync_dir
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.bands import SourceWeight, bands

from .encode import encode_into, type_bytes
from .metadata import UNKNOWN_PRE, add_arch, add_general, add_tokenizer
from .plan import (
    FILE_TYPES,
    GGUFArch,
    GGUFOptions,
    GGUFTensor,
    block_count,
    byte_shape,
    gguf_arch,
    keeps_mtp,
    plan_tensors,
)
from .sink import QUEUED, Buffers, DirectSink, PageCacheSink, open_direct
from .source import SLAB_ELEMENTS, MappedShards, Piece, computed, tensor_rows, weight_rows

PARTIAL = ".gguf-partial"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tiktoken.model")
Chunk = Callable[[], Piece]
Job = tuple[Chunk, gguf.GGMLQuantizationType, int]  # a piece to make, its type, its tensor's file offset
Progress = Callable[[int], None]


class _Values:
    """float32 values of HF logical weights from the checkpoint (any stored format), as pieces of rows."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.cfg = ck, ck.config
        self.linear = {w.name: w for w in ck.expected() if w.linear}
        self.shards = MappedShards(ck)

    def source(self, name: str) -> SourceWeight | torch.Tensor:
        w = self.linear.get(name)
        if w is None:
            return self.shards.get(name)
        fmt = self.ck.linear_format(name)
        return SourceWeight(self.shards.get, name, fmt, w.shape, self.cfg.quant.block)

    def whole(self, name: str) -> torch.Tensor:
        src = self.source(name)
        return src.float() if isinstance(src, torch.Tensor) else src.band(0, src.shape[0])

    def piece(self, name: str, r0: int | None = None, r1: int | None = None) -> Piece:
        """Rows ``r0:r1`` (default: all) of a stored weight or tensor."""
        src = self.source(name)
        if isinstance(src, torch.Tensor):
            rows = src.shape[0] if src.dim() >= 2 else 1
            return tensor_rows(src, name, r0 or 0, rows if r1 is None else r1)
        return weight_rows(src, r0 or 0, src.shape[0] if r1 is None else r1)

    def ranges(self, name: str) -> list[tuple[str, int, int]]:
        """What reading all of ``name`` touches, for read-ahead and release."""
        return self.piece(name).ranges


def _chunks(t: GGUFTensor, values: _Values) -> list[Chunk]:
    """Thunks giving the tensor's pieces in file order: row bands of a 2-D weight, one expert at a time of
    a stacked expert tensor (never the whole stack), the whole of anything else."""
    if len(t.sources) > 1:  # stacked routed experts, expert by expert
        return [lambda s=s: values.piece(s) for s in t.sources]
    src = t.sources[0]
    if t.part is not None:  # kv_b_proj per head: k_nope rows transposed, then v rows
        cfg = values.cfg

        def kv_part() -> torch.Tensor:
            kv = values.whole(src).view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            return (k_b.transpose(1, 2) if t.part == "k_b" else v_b).contiguous()

        shape = (math.prod(t.shape[:-1]), t.shape[-1])
        return [lambda: computed(shape, kv_part, values.ranges(src))]
    if len(t.shape) == 1:
        return [lambda: values.piece(src)]
    return [lambda r0=r0, r1=r1: values.piece(src, r0, r1) for r0, r1 in bands(*t.shape[:2])]


_scratch = threading.local()


def _encode(
    piece: Piece, qtype: gguf.GGMLQuantizationType, offset: int, shards: MappedShards, buffers: Buffers
) -> torch.Tensor:
    """The piece's bytes as ``qtype``: each slab of rows made float32 in this thread's scratch buffer (or
    read as stored) and encoded while in cache; the source's pages are dropped from this process afterwards."""
    rows, cols = piece.shape
    out = buffers.take(type_bytes(rows * cols, qtype), offset)  # (its address aligned like its file offset)
    per_row = out.numel() // max(rows, 1)
    scratch = getattr(_scratch, "buf", None)
    if scratch is None:
        scratch = _scratch.buf = torch.empty(SLAB_ELEMENTS, dtype=torch.float32)
    need = piece.step * cols
    if need > scratch.numel():
        scratch = torch.empty(need, dtype=torch.float32)
    for r0 in range(0, rows, piece.step):
        r1 = min(rows, r0 + piece.step)
        encode_into(piece.rows(r0, r1, scratch), qtype, out[r0 * per_row : r1 * per_row])
    shards.release(piece.ranges)
    return out


READ_AHEAD = 1 << 30  # bytes of source asked of the disk ahead of the encoders (page cache, not RSS)
WINDOW = 64 << 20  # bytes of output encoded ahead of the writer, so a stalled write does not stall them


class _Pipeline:
    """Encodes every piece of every tensor in order, ``workers`` threads up to :data:`WINDOW` bytes (and at
    least ``2 * workers`` pieces) ahead of the writer; yields each piece's bytes in file order. The sources of the pieces to come are asked for up to :data:`READ_AHEAD`
    bytes ahead, from a thread of its own, so the disk reads in long runs while it also writes."""

    def __init__(self, jobs: list[Job], workers: int, shards: MappedShards):
        self.jobs, self.workers, self.shards = jobs, max(1, workers), shards
        self.buffers = Buffers(WINDOW // Buffers.MIN_BYTES + 2 * self.workers + 2 + QUEUED)

    def _pieces(self) -> Iterator[tuple[Piece, gguf.GGMLQuantizationType, int]]:
        """Each job's piece (made once) with its file offset, its source asked for when it comes within
        ``READ_AHEAD``."""
        ahead: deque[tuple[Piece, gguf.GGMLQuantizationType, int, int]] = deque()
        jobs, asked, tensor, offset = iter(self.jobs), 0, -1, 0
        with ThreadPoolExecutor(1) as reader:
            while True:
                while asked < READ_AHEAD and (job := next(jobs, None)) is not None:
                    chunk, qtype, start = job
                    piece = chunk()
                    offset = offset if start == tensor else start
                    tensor = start
                    n = self.shards.nbytes(piece.ranges)
                    reader.submit(self.shards.prefetch, piece.ranges)
                    ahead.append((piece, qtype, offset, n))
                    offset += type_bytes(piece.shape[0] * piece.shape[1], qtype)
                    asked += n
                if not ahead:
                    return
                piece, qtype, at, n = ahead.popleft()
                asked -= n
                yield piece, qtype, at

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.workers == 1:
            for piece, qtype, at in self._pieces():
                yield _encode(piece, qtype, at, self.shards, self.buffers)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core per worker thread
        try:
            with ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                pending: deque[tuple[Future, int]] = deque()
                queued = 0
                for piece, qtype, at in self._pieces():
                    n = type_bytes(piece.shape[0] * piece.shape[1], qtype)
                    pending.append((pool.submit(_encode, piece, qtype, at, self.shards, self.buffers), n))
                    queued += n
                    while len(pending) > 2 * self.workers and queued > WINDOW:
                        done, n = pending.popleft()
                        queued -= n
                        yield done.result()
                while pending:
                    yield pending.popleft()[0].result()
        finally:
            torch.set_num_threads(threads)


@dataclass
class _Export:
    """One export: the open checkpoint, its GGUF architecture, whether MTP is kept, the tensors by file."""

    ck: Checkpoint
    arch: GGUFArch
    mtp: bool
    tensors: list[GGUFTensor]
    splits: list[list[GGUFTensor]]
    stem: str

    @property
    def cfg(self) -> ModelConfig:
        return self.ck.config

    def file_names(self) -> list[str]:
        n = len(self.splits)
        if n == 1:
            return [f"{self.stem}.gguf"]
        return [gguf.SHARD_NAME_FORMAT.format(self.stem, i + 1, n) for i in range(n)]


def split_tensors(tensors: list[GGUFTensor], max_size: int) -> list[list[GGUFTensor]]:
    """gguf's split rule: a new file when the current one holds a tensor and the next would take its data
    bytes past ``max_size`` (0: one file)."""
    splits: list[list[GGUFTensor]] = [[]]
    size = 0
    for t in tensors:
        n = byte_shape(t)[2]
        if splits[-1] and max_size and size + n > max_size:
            splits.append([])
            size = 0
        splits[-1].append(t)
        size += n
    return splits


def plan_gguf(model: str | Path, opts: GGUFOptions) -> tuple[Checkpoint, list[GGUFTensor]]:
    """The checkpoint (validated) and its planned GGUF tensors."""
    ck = Checkpoint(model)
    if opts.mtp and not ck.config.num_nextn_predict_layers:
        raise DSV3Error(
            f"--gguf-mtp: {ck.path} has no MTP layer (num_nextn_predict_layers 0); drop --gguf-mtp"
        )
    return ck, plan_tensors(ck.config, opts)


def summary(tensors: list[GGUFTensor]) -> dict:
    """Tensor and byte counts by GGML type, and every fallback (GGUF name -> what happened)."""
    by_type: dict[str, dict] = {}
    for t in tensors:
        row = by_type.setdefault(t.qtype.name, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += byte_shape(t)[2]
    return {
        "tensors": len(tensors),
        "bytes": sum(r["bytes"] for r in by_type.values()),
        "by_type": by_type,
        "fallbacks": {t.name: t.fallback for t in tensors if t.fallback},
    }


def _metadata(job: _Export, model: Path, opts: GGUFOptions) -> tuple[dict, str]:
    """Every metadata key of the first file (built once on a file-less writer) and the pre-tokenizer."""
    w = gguf.GGUFWriter(None, job.arch.name)
    add_general(w, opts.name or model.resolve().name)
    blocks = block_count(job.cfg, opts)
    add_arch(w, job.cfg, job.arch, job.mtp, blocks, FILE_TYPES[opts.gguf_type])
    pre = add_tokenizer(w, model, job.cfg, job.arch)
    return w.kv_data[0], pre


class _Writer(gguf.GGUFWriter):
    """gguf's writer, packing long numeric and string arrays (the vocabulary, its types, the merges) in
    one pass instead of value by value: the same bytes, about a second less on a 129k-token vocabulary."""

    _DTYPES = {
        gguf.GGUFValueType.UINT8: "u1",
        gguf.GGUFValueType.INT8: "i1",
        gguf.GGUFValueType.UINT16: "u2",
        gguf.GGUFValueType.INT16: "i2",
        gguf.GGUFValueType.UINT32: "u4",
        gguf.GGUFValueType.INT32: "i4",
        gguf.GGUFValueType.FLOAT32: "f4",
        gguf.GGUFValueType.UINT64: "u8",
        gguf.GGUFValueType.INT64: "i8",
        gguf.GGUFValueType.FLOAT64: "f8",
    }

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        V = gguf.GGUFValueType
        if vtype != V.ARRAY or not isinstance(val, list | tuple) or len(val) < 64:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else V.get_type(val[0])
        if ltype != V.STRING and ltype not in self._DTYPES:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        end = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = struct.pack(f"{end}IQ", ltype, len(val))
        if add_vtype:
            head = struct.pack(f"{end}I", vtype) + head
        if ltype != V.STRING:
            return head + np.asarray(val, dtype=end + self._DTYPES[ltype]).tobytes()
        data = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
        lengths = np.fromiter(map(len, data), dtype=end + "u8", count=len(data)).tobytes()
        return head + b"".join(lengths[8 * i : 8 * i + 8] + d for i, d in enumerate(data))


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType sizes


class _Cursor:
    """Reads a GGUF header without building its metadata (gguf's reader parses every token string)."""

    def __init__(self, buf: bytes | mmap.mmap):
        self.buf, self.pos = buf, 0

    def u(self, n: int) -> int:
        if self.pos + n > len(self.buf):
            raise ValueError("truncated")
        v = int.from_bytes(self.buf[self.pos : self.pos + n], "little")
        self.pos += n
        return v

    def string(self) -> bytes:
        n = self.u(8)
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def skip(self, vtype: int) -> None:
        if vtype == gguf.GGUFValueType.STRING:
            n = self.u(8)
            self.pos += n
        elif vtype == gguf.GGUFValueType.ARRAY:
            etype, n = self.u(4), self.u(8)
            if etype in _SCALAR_BYTES:
                self.pos += n * _SCALAR_BYTES[etype]
            else:
                for _ in range(n):
                    self.skip(etype)
        else:
            self.pos += _SCALAR_BYTES[vtype]


def _complete(path: Path, tensors: list[GGUFTensor]) -> bool:
    """Whether a file under its final name holds exactly the planned tensors (names, types, shapes, data
    offsets) and all their data."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            have, data_start, align = _tensor_infos(_Cursor(buf))
        except (ValueError, UnicodeDecodeError, KeyError):
            return False
    want, offset = [], 0
    for t in tensors:
        want.append((t.name, tuple(t.shape), int(t.qtype), offset))
        offset += gguf.GGUFWriter.ggml_pad(byte_shape(t)[2], align)
    return have == want and path.stat().st_size == data_start + offset


def _tensor_infos(c: _Cursor) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int, int]:
    """(name, numpy shape, GGML type, data offset) of each tensor info, where the data starts, alignment."""
    if c.u(4) != gguf.GGUF_MAGIC or c.u(4) != gguf.GGUF_VERSION:
        raise ValueError("not a GGUF v3 file")
    n_tensors, n_kv = c.u(8), c.u(8)
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, vtype = c.string(), c.u(4)
        if key == gguf.Keys.General.ALIGNMENT.encode():
            align = c.u(4)
        else:
            c.skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name, dims = c.string().decode(), [c.u(8) for _ in range(c.u(4))]
        infos.append((name, tuple(reversed(dims)), c.u(4), c.u(8)))
    return infos, gguf.GGUFWriter.ggml_pad(c.pos, align), align


def _write_file(
    job: _Export, k: int, kv: dict, path: Path, values: _Values, opts: GGUFOptions, progress: Progress | None
) -> None:
    """File ``k`` of the export at ``path``: its metadata (all of it in the first file), the ``split.*``
    keys when there are several, its tensor infos and data; flushed and fsynced."""
    w = _Writer(path, job.arch.name)
    w.kv_data[0] = dict(kv) if k == 0 else {}
    if len(job.splits) > 1:
        keys, V = gguf.Keys.Split, gguf.GGUFValueType
        w.kv_data[0][keys.LLM_KV_SPLIT_NO] = gguf.GGUFValue(k, V.UINT16)
        w.kv_data[0][keys.LLM_KV_SPLIT_COUNT] = gguf.GGUFValue(len(job.splits), V.UINT16)
        w.kv_data[0][keys.LLM_KV_SPLIT_TENSORS_COUNT] = gguf.GGUFValue(len(job.tensors), V.INT32)
    tensors = job.splits[k]
    for t in tensors:
        shape, dtype, nbytes = byte_shape(t)
        w.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())  # the data region starts aligned
    fout.flush()
    os.fsync(fout.fileno())
    fd = open_direct(path)
    try:
        sink = DirectSink(path, fd) if fd is not None else PageCacheSink(fout)
        _write_data(sink, tensors, fout.tell(), w.data_alignment, values, opts, progress)
    finally:
        if fd is not None:
            os.close(fd)
    w.close()


def _write_data(
    sink: DirectSink | PageCacheSink,
    tensors: list[GGUFTensor],
    start: int,
    align: int,
    values: _Values,
    opts: GGUFOptions,
    progress: Progress | None,
) -> None:
    """Every tensor's bytes, each padded to ``align``, from file offset ``start`` on, through ``sink``."""
    chunk_lists = [_chunks(t, values) for t in tensors]
    jobs, offset = [], start
    for t, cl in zip(tensors, chunk_lists, strict=True):
        jobs += [(c, t.qtype, offset) for c in cl]
        offset += gguf.GGUFWriter.ggml_pad(byte_shape(t)[2], align)
    pipeline = _Pipeline(jobs, opts.workers, values.shards)
    stream = iter(pipeline)
    try:
        for t, cl in zip(tensors, chunk_lists, strict=True):
            written = 0
            for _ in cl:
                data = next(stream)
                sink.write(data, functools.partial(pipeline.buffers.give, data))
                written += data.numel()
                if progress is not None:
                    progress(data.numel())
            if written != byte_shape(t)[2]:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, declared {byte_shape(t)[2]}")
            pad = gguf.GGUFWriter.ggml_pad(written, align) - written
            if pad:
                sink.write(torch.zeros(pad, dtype=torch.uint8))
        sink.close()
    finally:
        stream.close()  # its threads end here, not when it is collected
        sink.io.shutdown(wait=True)


def _copy_tokenizer(model: Path, out: Path) -> None:
    """The tokenizer files beside the GGUF, where ``load_tokenizer`` looks for them (atomic copies)."""
    for name in TOKENIZER_FILES:
        if (model / name).is_file() and (model.resolve() / name) != (out.resolve() / name):
            atomic_copy(model / name, out / name)


def _remove_stale(out: Path, stem: str, keep: list[str]) -> None:
    """Files of an earlier export of the same stem with another split count."""
    for f in [out / f"{stem}.gguf", *out.glob(f"{stem}-?????-of-?????.gguf")]:
        if f.name not in keep and f.is_file():
            f.unlink()


def plan_size(model: str | Path, opts: GGUFOptions) -> int:
    """Bytes of tensor data an export of ``model`` writes (for a progress bar)."""
    ck, tensors = plan_gguf(model, opts)
    ck.close()
    return summary(tensors)["bytes"]


def write_report(path: Path, result: dict, tensors: list[GGUFTensor]) -> None:
    """``--report``: the result plus one row per GGUF tensor (type, shape, fallback, first HF source)."""
    rows = [
        {
            "name": t.name,
            "type": t.qtype.name,
            "shape": list(t.shape),
            "fallback": t.fallback,
            "source": t.sources[0]
            if len(t.sources) == 1
            else f"{t.sources[0]} .. ({len(t.sources)} experts)",
        }
        for t in tensors
    ]
    atomic_write_json(path, dict(result, tensor_types=rows))


def export_gguf(
    model: str | Path,
    out: str | Path,
    opts: GGUFOptions,
    dry_run: bool = False,
    progress: Progress | None = None,
    report: str | Path | None = None,
) -> dict:
    """Write ``OUT/<name>-<TYPE>.gguf`` (or its gguf-split files), resuming at the first missing file;
    returns what was planned and written (``progress`` is called with each chunk's bytes; ``report`` also
    writes it, with every tensor's type, as JSON)."""
    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    ck, tensors = plan_gguf(model, opts)
    splits = split_tensors(tensors, opts.split_max_size)
    stem = f"{opts.name or model.resolve().name}-{opts.gguf_type.upper()}"
    job = _Export(ck, gguf_arch(ck.config), keeps_mtp(ck.config, opts), tensors, splits, stem)
    names = job.file_names()
    result = {
        "model": str(model),
        "out": str(out),
        "gguf_type": opts.gguf_type,
        "arch": job.arch.name,
        "mtp": job.mtp and bool(ck.config.num_nextn_predict_layers),
        "block_count": block_count(ck.config, opts),
        **summary(tensors),
        "splits": [
            {"file": n, "tensors": len(s), "bytes": summary(s)["bytes"]}
            for n, s in zip(names, splits, strict=True)
        ],
    }
    if dry_run:
        ck.close()
        return dict(result, dry_run=True, files=[str(out / n) for n in names])
    try:
        written, skipped, pre = _write_all(job, model, out, opts, progress)
    finally:
        ck.close()
    warnings = []
    if pre == UNKNOWN_PRE:
        warnings.append(
            f"{model / 'tokenizer.json'}: not a tokenizer llama.cpp's converter recognises; wrote "
            f"tokenizer.ggml.pre {UNKNOWN_PRE!r} (llama.cpp then splits text with its default regex)"
        )
    result.update(
        tokenizer_pre=pre,
        files=[str(out / n) for n in names],
        written=written,
        skipped=skipped,
        warnings=warnings,
        seconds=round(time.perf_counter() - t0, 2),
    )
    if report is not None:
        write_report(Path(report), result, tensors)
        result["report"] = str(report)
    return result


def _write_all(
    job: _Export, model: Path, out: Path, opts: GGUFOptions, progress: Progress | None
) -> tuple[list[str], list[str], str]:
    """Every file not already complete under its final name, each through ``OUT/.gguf-partial``."""
    names = job.file_names()
    kv, pre = _metadata(job, model, opts)
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(model, out)
    values = _Values(job.ck)
    written, skipped = [], []
    try:
        for k, name in enumerate(names):
            if _complete(out / name, job.splits[k]):
                skipped.append(name)
                if progress is not None:
                    progress(summary(job.splits[k])["bytes"])
                continue
            tmp = partial / name
            tmp.unlink(missing_ok=True)
            _write_file(job, k, kv, tmp, values, opts, progress)
            os.replace(tmp, out / name)
            fsync_dir(out)
            written.append(name)
    finally:
        values.shards.close()
    _remove_stale(out, job.stem, names)
    shutil.rmtree(partial, ignore_errors=True)
    return written, skipped, pre
