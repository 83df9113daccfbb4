"""Writing a checkpoint: plan output shards under a size cap, stream each shard tensor by tensor to a
temporary name, then make it durable, rename it and record it as finished (so that a re-run resumes);
write the index and config.json last. Finished shards become final in batches (one filesystem flush per
batch, every ``DSV3TOOLS_SYNC_INTERVAL`` seconds and at the end) instead of one fsync per shard: each fsync
stalled every writer on a flush of the whole disk. Also the atomic small-file writes every command uses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from dsv3tools.checkpoint.fsutil import (
    atomic_copy,
    atomic_write_bytes,
    atomic_write_json,
    free_bytes,
    fsync_dir,
    sync_filesystem,
)
from dsv3tools.checkpoint.layout import nbytes
from dsv3tools.errors import DSV3Error

STATE_DIR = ".dsv3tools"
SYNC_INTERVAL_S = 30.0  # finished shards become final at most this long after being written
DEFAULT_SHARD_BYTES = 5 * 10**9
TORCH_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class OutSpec:
    """One output tensor: its name, safetensors dtype tag, shape, and a picklable ``key`` for the producer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    key: object = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class ShardPlan:
    filename: str
    tensors: list[OutSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


Producer = Callable[[OutSpec], "torch.Tensor | None"]


def shard_name(i: int, n: int, prefix: str = "model") -> str:
    """HF shard naming as in the release: ``model-00001-of-000163.safetensors``."""
    return f"{prefix}-{i + 1:05d}-of-{n:06d}.safetensors"


def plan_shards(
    specs: Iterable[OutSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model"
) -> list[ShardPlan]:
    """Greedy fill in order: a new shard starts when the next tensor would pass the cap."""
    groups: list[list[OutSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    return [ShardPlan(shard_name(i, len(groups), prefix), g) for i, g in enumerate(groups) if g]


def header_bytes(tensors: list[OutSpec], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = [], 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets.append(pos)
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def tmp_path(path: Path) -> Path:
    """Where a shard is written before it is durable and renamed to ``path``."""
    return path.with_name(f".{path.name}.tmp")


def write_shard(
    path: Path, plan: ShardPlan, produce: Producer, metadata: dict[str, str] | None = None
) -> int:
    """Stream one shard to :func:`tmp_path` ``(path)``: header, then each tensor as it is produced (``None``
    leaves a sparse hole). Returns the size; the executor makes it durable and renames it to ``path``."""
    head, offsets = header_bytes(plan.tensors, metadata)
    with open(tmp_path(path), "wb") as f:
        f.write(head)
        for spec, off in zip(plan.tensors, offsets, strict=True):
            t = produce(spec)
            if t is None:
                continue
            if ST_DTYPES.get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise RuntimeError(
                    f"{spec.name}: produced {t.dtype} {list(t.shape)}, planned {spec.dtype} {list(spec.shape)}"
                )
            f.seek(len(head) + off)
            f.write(tensor_bytes(t))
        total = len(head) + plan.nbytes
        f.truncate(total)
    return total


def plan_fingerprint(obj: object) -> str:
    """A stable hash of a JSON-able description of the work (inputs, options, shard plan)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shards_fingerprint(shards: list[ShardPlan]) -> list:
    return [[s.filename, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in shards]


@dataclass
class WriteJob:
    """A whole output checkpoint: shards to write, how to produce each tensor, and what to write last."""

    out_dir: Path
    shards: list[ShardPlan]
    produce: Producer
    config: dict | None
    command: str
    options: dict = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)  # destination name -> source file
    extra_data: dict[str, object] = field(default_factory=dict)  # destination name -> bytes or a JSON object
    index_name: str | None = "model.safetensors.index.json"
    metadata: dict[str, str] | None = None
    sparse: bool = False  # data regions are holes: no disk space is needed for them
    # writes one shard to its temporary name and returns its size; default :func:`write_shard`
    shard_writer: Callable[[Path, ShardPlan, Producer, dict[str, str] | None], int] | None = None

    @cached_property
    def fingerprint(self) -> str:
        return plan_fingerprint([self.command, self.options, _shards_fingerprint(self.shards)])

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def state_dir(self) -> Path:
        return self.out_dir / STATE_DIR

    def done_marker(self, shard: ShardPlan) -> Path:
        return self.state_dir() / "done" / f"{shard.filename}.json"

    def is_done(self, shard: ShardPlan) -> bool:
        m, f = self.done_marker(shard), self.out_dir / shard.filename
        if not (m.is_file() and f.is_file()):
            return False
        try:
            rec = json.loads(m.read_text())
        except json.JSONDecodeError:
            return False
        return rec.get("fingerprint") == self.fingerprint and rec.get("size") == f.stat().st_size


def _prepare_out_dir(job: WriteJob) -> None:
    """Create the output folder, or accept it only if it holds this very job's partial output."""
    out, plan_file = job.out_dir, job.state_dir() / "plan.json"
    if out.exists() and not out.is_dir():
        raise DSV3Error(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        rec = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        if rec is None:
            raise DSV3Error(
                f"{out}: output folder is not empty and was not written by dsv3tools; choose another --out or empty it"
            )
        if rec.get("fingerprint") != job.fingerprint:
            raise DSV3Error(
                f"{out}: output folder holds a different {rec.get('command', 'job')} ({rec.get('options')}); "
                "choose another --out or remove it"
            )
    (job.state_dir() / "done").mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        atomic_write_json(
            plan_file, {"fingerprint": job.fingerprint, "command": job.command, "options": job.options}
        )


def _check_space(job: WriteJob, todo: list[ShardPlan]) -> None:
    need = 0 if job.sparse else sum(s.nbytes for s in todo)
    free = free_bytes(job.out_dir)
    if need > free:
        raise DSV3Error(
            f"{job.out_dir}: not enough disk space: need {need / 1e9:.2f} GB, free {free / 1e9:.2f} GB; free space or choose another --out"
        )


def _write_one(job: WriteJob, shard: ShardPlan) -> int:
    """Write one shard to its temporary name (in a worker process or in this one); returns its size."""
    write = job.shard_writer or write_shard
    return write(job.out_dir / shard.filename, shard, job.produce, job.metadata)


class _Finisher:
    """Written shards (under temporary names) become final in batches: one filesystem flush makes the
    batch durable, then each shard is renamed to its final name and recorded as done, and a second flush
    makes the renames and records durable. A final name thus never holds bytes that are not on disk, and
    a re-run skips exactly the recorded shards. A batch closes ``interval`` seconds after the previous one
    (env ``DSV3TOOLS_SYNC_INTERVAL``; 0: after every shard) and at the end, so an interruption loses at
    most that much finished work."""

    def __init__(self, job: WriteJob):
        self.job, self.pending = job, []
        self.interval = float(os.environ.get("DSV3TOOLS_SYNC_INTERVAL", SYNC_INTERVAL_S))
        self.since = time.monotonic()

    def add(self, shard: ShardPlan, size: int) -> None:
        self.pending.append((shard, size))
        if time.monotonic() - self.since >= self.interval:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        sync_filesystem(self.job.out_dir)
        for shard, size in self.pending:
            path = self.job.out_dir / shard.filename
            written = tmp_path(path).stat().st_size
            if written != size:
                raise RuntimeError(f"{tmp_path(path)}: {written} bytes written, {size} planned")
            os.replace(tmp_path(path), path)
            record = {"fingerprint": self.job.fingerprint, "size": size}
            atomic_write_json(self.job.done_marker(shard), record, durable=False)
        sync_filesystem(self.job.out_dir)
        self.pending, self.since = [], time.monotonic()


_FORK_JOB: WriteJob | None = None


def _fork_worker(i: int) -> int:
    torch.set_num_threads(1)
    assert _FORK_JOB is not None
    return _write_one(_FORK_JOB, _FORK_JOB.shards[i])


def select_part(n: int, part: tuple[int, int] | None) -> list[int]:
    """Shard indices of part ``K/N`` (1-based K): every N-th shard starting at K-1."""
    if part is None:
        return list(range(n))
    k, parts = part
    if not 1 <= k <= parts:
        raise DSV3Error(f"--part {k}/{parts}: K must be in 1..N")
    return list(range(k - 1, n, parts))


def execute(
    job: WriteJob,
    workers: int = 1,
    part: tuple[int, int] | None = None,
    on_shard: Callable[[ShardPlan, int], None] | None = None,
) -> dict:
    """Write every shard not yet finished (of ``part`` if given); without ``part`` also finish the folder.
    ``workers`` > 1 forked processes take the shards largest first (on_shard reports them in that order).

    Returns ``{"written": [...], "skipped": [...], "complete": bool, "bytes": int}``.
    """
    global _FORK_JOB
    _prepare_out_dir(job)
    mine = [job.shards[i] for i in select_part(len(job.shards), part)]
    todo = [s for s in mine if not job.is_done(s)]
    skipped = [s.filename for s in mine if s not in todo]
    _check_space(job, todo)
    finisher = _Finisher(job)

    def written(shard: ShardPlan, size: int) -> None:
        finisher.add(shard, size)
        if on_shard:
            on_shard(shard, shard.nbytes)

    try:
        if workers > 1 and len(todo) > 1:
            _FORK_JOB = job
            with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
                # largest first: the last shard to start is a small one, so the workers finish together
                idx = sorted((job.shards.index(s) for s in todo), key=lambda i: -job.shards[i].nbytes)
                for i, size in zip(idx, pool.imap(_fork_worker, idx), strict=True):
                    written(job.shards[i], size)
        else:
            for s in todo:
                written(s, _write_one(job, s))
    except BaseException:
        with contextlib.suppress(Exception):
            finisher.flush()  # keep what was written before the failure
        raise
    finally:
        _FORK_JOB = None
    finisher.flush()
    complete = False
    if part is None or all(job.is_done(s) for s in job.shards):
        missing = [s.filename for s in job.shards if not job.is_done(s)]
        if missing:
            raise RuntimeError(f"{job.out_dir}: shards not finished: {missing[:3]}")
        finish(job)
        complete = True
    return {
        "written": [s.filename for s in todo],
        "skipped": skipped,
        "complete": complete,
        "bytes": job.total_bytes,
    }


def finish(job: WriteJob) -> None:
    """Copy extra files, then write the index and config.json last."""
    for dst, src in job.extra_files.items():
        atomic_copy(src, job.out_dir / dst)
    for dst, obj in job.extra_data.items():
        if isinstance(obj, bytes):
            atomic_write_bytes(job.out_dir / dst, obj)
        else:
            atomic_write_json(job.out_dir / dst, obj)
    if job.index_name:
        weight_map = {t.name: s.filename for s in job.shards for t in s.tensors}
        atomic_write_json(
            job.out_dir / job.index_name,
            {"metadata": {"total_size": job.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
    if job.config is not None:
        atomic_write_json(job.out_dir / "config.json", job.config)
    fsync_dir(job.out_dir)


def non_weight_files(src: Path) -> dict[str, Path]:
    """Files of a checkpoint folder to carry over to a converted copy (tokenizer, generation config, ...)."""
    skip = {"config.json", "model.safetensors.index.json"}
    return {
        p.name: p
        for p in sorted(src.iterdir())
        if p.is_file()
        and not p.name.endswith(".safetensors")
        and p.name not in skip
        and not p.name.startswith(".")
    }
