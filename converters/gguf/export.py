"""``convert --to gguf``: one streaming pass from any stored format (fp8 blocks, bf16, int4, fp4) to a GGUF
file, or gguf-split files, in bounded memory.

Tensors go into files by gguf's own split rule (``GGUFWriter.add_tensor_info``: a file takes tensors until
the next would take its data past ``--gguf-split-max-size``) and the files are named as llama.cpp's
gguf-split names them (``<stem>-00001-of-0000N.gguf``); the first holds all the metadata, each holds the
three ``split.*`` keys. Each file is one ``GGUFWriter``: every tensor declared (``add_tensor_info``), the
header, metadata and tensor infos written, then the data tensor by tensor. A tensor's values are produced
in chunks: row bands of a 2-D weight, one expert at a time of a stacked expert tensor (never the whole
stack), dequantized to float32 from the memory-mapped source and encoded by ``gguf.quants.quantize`` (the
encoder llama.cpp's converter uses, so both write the same bytes for the same float32 values). With
``workers > 1`` chunks are encoded by a thread pool a few chunks ahead and written in order.

Each file is written under ``OUT/.gguf-partial/``, fsynced, and renamed into ``OUT`` when complete, so an
interrupted run leaves nothing under a final name. A re-run keeps every file already under its final name
whose tensors are the ones planned for it (a resumed split export starts at the first missing file) and
writes the rest."""

from __future__ import annotations

import mmap
import os
import shutil
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

from .metadata import UNKNOWN_PRE, add_arch, add_general, add_tokenizer
from .plan import (
    FILE_TYPES,
    QTYPES,
    GGUFArch,
    GGUFOptions,
    GGUFTensor,
    block_count,
    byte_shape,
    gguf_arch,
    keeps_mtp,
    plan_tensors,
)

PARTIAL = ".gguf-partial"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tiktoken.model")
Chunk = Callable[[], np.ndarray]
Progress = Callable[[int], None]


class _Values:
    """float32 values of HF logical weights from the checkpoint (any stored format), in row bands."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.cfg = ck, ck.config
        self.linear = {w.name: w for w in ck.expected() if w.linear}

    def source(self, name: str) -> SourceWeight | torch.Tensor:
        w = self.linear.get(name)
        if w is None:
            return self.ck.get(name)
        fmt = self.ck.linear_format(name)
        return SourceWeight(self.ck.get, name, fmt, w.shape, self.cfg.quant.block)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        src = self.source(name)
        if isinstance(src, torch.Tensor):
            return src[r0:r1].float()
        return src.band(r0, r1)

    def whole(self, name: str) -> torch.Tensor:
        src = self.source(name)
        return src.float() if isinstance(src, torch.Tensor) else src.band(0, src.shape[0])


def _chunks(t: GGUFTensor, values: _Values) -> list[Chunk]:
    """Thunks giving the tensor's float32 values in file order (row bands / one expert each)."""
    if len(t.sources) > 1:  # stacked routed experts, expert by expert
        return [lambda s=s: values.whole(s).numpy() for s in t.sources]
    src = t.sources[0]
    if t.part is not None:  # kv_b_proj per head: k_nope rows transposed, then v rows
        cfg = values.cfg

        def kv_part() -> np.ndarray:
            kv = values.whole(src).view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            return (k_b.transpose(1, 2) if t.part == "k_b" else v_b).contiguous().numpy()

        return [kv_part]
    if len(t.shape) == 1:
        return [lambda: values.whole(src).numpy()]
    return [lambda r0=r0, r1=r1: values.rows(src, r0, r1).numpy() for r0, r1 in bands(*t.shape[:2])]


def _encode(chunk: Chunk, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = chunk()
    if qtype == QTYPES["f32"]:
        return np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(data, qtype)


class _Pipeline:
    """Encodes every chunk of every tensor in order, ``workers`` threads a bounded distance ahead."""

    def __init__(self, jobs: list[tuple[Chunk, gguf.GGMLQuantizationType]], workers: int):
        self.jobs, self.workers = jobs, max(1, workers)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.workers == 1:
            for chunk, qtype in self.jobs:
                yield _encode(chunk, qtype)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque[Future] = deque()
            it = iter(self.jobs)
            for chunk, qtype in it:
                pending.append(pool.submit(_encode, chunk, qtype))
                if len(pending) >= 2 * self.workers:
                    break
            for chunk, qtype in it:
                yield pending.popleft().result()
                pending.append(pool.submit(_encode, chunk, qtype))
            while pending:
                yield pending.popleft().result()


class _Streamed:
    """What ``GGUFWriter.write_tensor_data`` needs of an array (``nbytes``, ``tofile``), filled from the
    pipeline chunk by chunk."""

    def __init__(self, nbytes: int, n_chunks: int, stream: Iterator[np.ndarray], progress: Progress | None):
        self.nbytes, self.n_chunks, self.stream, self.progress = nbytes, n_chunks, stream, progress

    def tofile(self, fout) -> None:
        written = 0
        for _ in range(self.n_chunks):
            arr = next(self.stream)
            arr.tofile(fout)
            written += arr.nbytes
            if self.progress is not None:
                self.progress(arr.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"GGUF tensor data: wrote {written} bytes, declared {self.nbytes}")


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
    w = gguf.GGUFWriter(path, job.arch.name)
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
    chunk_lists = [_chunks(t, values) for t in tensors]
    jobs = [(c, t.qtype) for t, cl in zip(tensors, chunk_lists, strict=True) for c in cl]
    stream = iter(_Pipeline(jobs, opts.workers))
    for t, cl in zip(tensors, chunk_lists, strict=True):
        w.write_tensor_data(_Streamed(byte_shape(t)[2], len(cl), stream, progress))
    for f in w.fout or []:
        f.flush()
        os.fsync(f.fileno())
    w.close()


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
    _remove_stale(out, job.stem, names)
    shutil.rmtree(partial, ignore_errors=True)
    return written, skipped, pre
