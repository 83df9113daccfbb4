"""``convert``: any of fp8 blocks / bf16 / int4 (compressed-tensors pack-quantized W4A16) to any other,
streaming tensor by tensor from mmap into output shards that follow the input shard boundaries (output
shard i holds the weights whose main tensor sits in input shard i), so ``--part K/N`` splits the work by
shard, a re-run resumes shard by shard (``dsv3tools.checkpoint.writer``), and peak memory is about one tensor.

Per logical weight: non-linear tensors and unquantizable linears (eh_proj) are byte copies; a
quantizable linear whose source format and options equal the target is a byte copy too; otherwise its
float32 source (fp8 dequantized in float32, never via bf16) is re-encoded. The int4 ``experts`` scope
quantizes routed experts only and stores the other linears as bf16 (listed in the ``ignore`` regexes so
vLLM's compressed-tensors matching leaves exactly those modules unquantized). ``mse`` int4 is recorded
as ``observer: "mse"`` in the config group (``rtn`` keeps ``minmax``). ``conversion_report`` reads the
written output back and gives ``||w' - w|| / ||w||`` of every re-encoded weight.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3tools.checkpoint.layout import TENSOR_SUFFIXES, Weight, storage
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.writer import (
    OutSpec,
    ShardPlan,
    WriteJob,
    execute,
    non_weight_files,
    plan_fingerprint,
    shard_name,
)
from dsv3tools.converters.fp_targets import (
    FP4_TARGETS,
    TARGETS,
    CastF16,
    TargetEncoder,
    check_fp4_shape,
    check_fp16_range,
    float_format,
    fp4_quantization_config,
)
from dsv3tools.converters.tensor_io import Location, ShardReader, write_shard_streaming
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.bands import BAND_ELEMENTS, SourceWeight, encode_fp8, encode_int4, rel_error
from dsv3tools.quant.ct_config import int4_ignore, int4_quantization_config

FORMATS = ("bf16", "fp8", "int4", *TARGETS)
BLOCK = (128, 128)
FP8_QCONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


@dataclass(frozen=True)
class ConvertOptions:
    """Target format and its options (only the ones of the target format matter)."""

    to: str
    group_size: int = 128
    int4_scope: str = "experts"
    int4_method: str = "rtn"
    scale_fmt: str = "float"

    def check(self) -> None:
        if self.to not in FORMATS:
            raise DSV3Error(f"--to {self.to!r}: use one of {', '.join(FORMATS)}")
        if self.int4_scope not in ("experts", "all"):
            raise DSV3Error(f"--int4-scope {self.int4_scope!r}: use experts or all")
        if self.int4_method not in ("rtn", "mse"):
            raise DSV3Error(f"--int4-method {self.int4_method!r}: use rtn or mse")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise DSV3Error(f"--scale-fmt {self.scale_fmt!r}: use float or ue8m0")
        if self.group_size < 8 or self.group_size % 8:
            raise DSV3Error(f"--group-size {self.group_size}: must be a positive multiple of 8")

    def relevant(self) -> dict:
        """The options that define the output (for the resume fingerprint and the report)."""
        if self.to == "fp8":
            return {"to": "fp8", "scale_fmt": self.scale_fmt}
        if self.to == "int4":
            return {
                "to": "int4",
                "group_size": self.group_size,
                "int4_scope": self.int4_scope,
                "int4_method": self.int4_method,
            }
        if self.to in FP4_TARGETS:
            return {"to": self.to, "int4_scope": self.int4_scope}
        return {"to": self.to}


def is_routed_expert(w: Weight) -> bool:
    return ".mlp.experts." in w.name


def target_format(w: Weight, opts: ConvertOptions) -> str:
    """Storage format of one quantizable linear in the output."""
    if opts.to in ("int4", *FP4_TARGETS) and opts.int4_scope == "experts" and not is_routed_expert(w):
        return "bf16"
    return opts.to


def source_options(ck: Checkpoint) -> dict:
    """What the source's quantized linears were written with (scale format, int4 group and method)."""
    qc = ck.config.raw.get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values()) if isinstance(qc, dict) else []
    observer = ((groups[0].get("weights") or {}).get("observer") if groups else None) or "minmax"
    return {
        "scale_fmt": ck.config.quant.scale_fmt,
        "block": ck.config.quant.block,
        "group_size": ck.config.quant.group_size,
        "int4_method": "mse" if observer == "mse" else "rtn",
    }


def is_copy(src_fmt: str, dst_fmt: str, src: dict, opts: ConvertOptions) -> bool:
    """Same format with the same options: the stored tensors are copied byte for byte."""
    if src_fmt != dst_fmt:
        return False
    if dst_fmt == "fp8":
        return src["scale_fmt"] == opts.scale_fmt and tuple(src["block"]) == BLOCK
    if dst_fmt == "int4":
        return src["group_size"] == opts.group_size and src["int4_method"] == opts.int4_method
    return True


def quantization_config(ck: Checkpoint, opts: ConvertOptions) -> dict | None:
    """The output's ``quantization_config`` (None: the key is removed, as for bf16)."""
    if opts.to in ("bf16", "fp16"):
        return None
    if opts.to in FP4_TARGETS:
        return fp4_quantization_config(opts.to, int4_ignore(ck.config, opts.int4_scope))
    if opts.to == "fp8":
        return dict(FP8_QCONFIG, scale_fmt="ue8m0") if opts.scale_fmt == "ue8m0" else dict(FP8_QCONFIG)
    return int4_quantization_config(
        opts.group_size, opts.int4_method, int4_ignore(ck.config, opts.int4_scope)
    )


# ---- planning --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conversion:
    """How one re-encoded linear is made (the key of its output tensors)."""

    prefix: str
    shape: tuple[int, int]
    src_fmt: str
    dst_fmt: str


def _weight_specs(ck: Checkpoint, w: Weight, src: dict, opts: ConvertOptions, infos: dict) -> list[OutSpec]:
    """Output tensors of one logical weight: copies keep the stored tensors, conversions re-encode."""
    stored = ck.storage_of(w)
    if w.linear and w.quantizable:
        src_fmt = float_format(infos, w.name)
        dst_fmt = target_format(w, opts)
        if not is_copy(src_fmt, dst_fmt, src, opts):
            if dst_fmt in FP4_TARGETS:
                check_fp4_shape(w, dst_fmt)
            if dst_fmt == "int4" and w.shape[1] % opts.group_size:
                raise DSV3Error(
                    f"{w.name}: input dimension {w.shape[1]} is not a multiple of --group-size {opts.group_size}"
                )
            conv = Conversion(w.name, (w.shape[0], w.shape[1]), src_fmt, dst_fmt)
            return [
                OutSpec(n, dt, sh, key=conv)
                for n, (dt, sh) in storage(w, dst_fmt, BLOCK, opts.group_size).items()
            ]
    if opts.to == "fp16":  # every BF16 tensor becomes F16
        return [
            OutSpec(n, "F16", infos[n].shape, key=CastF16(n))
            if infos[n].dtype == "BF16"
            else OutSpec(n, infos[n].dtype, infos[n].shape, key=None)
            for n in stored
        ]
    return [OutSpec(n, infos[n].dtype, infos[n].shape, key=None) for n in stored]


def plan_convert(ck: Checkpoint, opts: ConvertOptions) -> list[ShardPlan]:
    """One output shard per input shard holding the weights whose first stored tensor is there."""
    opts.check()
    ck.validate()
    infos = ck.infos()
    src = source_options(ck)
    anchors: dict[str, Weight] = {}
    for w in ck.expected():
        anchors[next(iter(ck.storage_of(w)))] = w
    groups: list[list[OutSpec]] = []
    for shard in ck.shards:
        specs: list[OutSpec] = []
        for name in ck.names_in(shard):
            w = anchors.get(name)
            if w is not None:
                specs += _weight_specs(ck, w, src, opts, infos)
        if specs:
            groups.append(specs)
    return [ShardPlan(shard_name(i, len(groups)), g) for i, g in enumerate(groups)]


def source_fingerprint(ck: Checkpoint) -> str:
    """Identity of the source from its config and headers (not its path: --part may run on other hosts)."""
    infos = ck.infos()
    return plan_fingerprint(
        [
            ck.config.raw,
            sorted((n, i.shard, i.dtype, list(i.shape), list(i.offsets)) for n, i in infos.items()),
        ]
    )


# ---- producing -------------------------------------------------------------------------------------
class ConvertProducer:
    """Produces each planned output tensor on demand; a linear is encoded once for its 2-3 tensors."""

    def __init__(self, ck: Checkpoint, opts: ConvertOptions):
        self.block = tuple(ck.config.quant.block) if ck.config.quant.method == "fp8" else BLOCK
        self.opts = opts
        self.reader = ShardReader(ck.path, ck.infos())
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._scratch = torch.empty(0, dtype=torch.float32)
        self._out = [torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16)]
        self._turn = 0
        self.targets = TargetEncoder(self.reader.get, ck.infos(), self.block)
        self._done: list[str] = []  # prefixes of encoded linears, oldest first, whose pages are not released

    def out_buffer(self, shape: tuple[int, int]) -> torch.Tensor:
        """One of two reused bf16 output buffers, in turn: the streaming writer has at most one tensor in
        flight while the next is produced, so alternating two buffers is safe and needs no allocation or
        page faults per tensor."""
        n = shape[0] * shape[1]
        self._turn ^= 1
        if self._out[self._turn].numel() < n:
            self._out[self._turn] = torch.empty(0, dtype=torch.bfloat16)  # free the old one first
            self._out[self._turn] = torch.empty(n, dtype=torch.bfloat16)
        return self._out[self._turn][:n].view(shape)

    def scratch(self, cols: int) -> torch.Tensor:
        """A reused float32 band buffer (no page faults per tensor)."""
        need = max(BAND_ELEMENTS, 128 * cols)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        return self._scratch

    def prefetch(self, spec: OutSpec) -> None:
        """Readahead of the source tensors of the linear that ``spec`` re-encodes (byte copies need none:
        they are copied in the kernel)."""
        conv = spec.key
        if not isinstance(conv, Conversion) or (self._cache is not None and self._cache[0] == conv.prefix):
            return
        for suffix in TENSOR_SUFFIXES:
            self.reader.prefetch(f"{conv.prefix}.{suffix}")

    def locate(self, spec: OutSpec) -> Location | None:
        """The source bytes of a byte-copied tensor (None for re-encoded ones)."""
        return self.reader.locate(spec.name) if spec.key is None else None

    def __call__(self, spec: OutSpec) -> torch.Tensor:
        conv = spec.key
        if conv is None:
            return self.reader.get(spec.name)
        if isinstance(conv, CastF16):
            return self.reader.get(spec.name).to(torch.float16)
        if self._cache is None or self._cache[0] != conv.prefix:
            self._cache = None
            self._cache = (conv.prefix, self.encode(conv))
            self._release_old(conv.prefix)
        return self._cache[1][spec.name]

    def _release_old(self, prefix: str) -> None:
        """Release the source pages of linears encoded two or more linears ago. The last two stay mapped:
        the previous linear's last tensor may still be in the writer's one in-flight write, and a bf16
        source can be written straight from its mapped view."""
        self._done.append(prefix)
        while len(self._done) > 2:
            old = self._done.pop(0)
            for suffix in TENSOR_SUFFIXES:
                self.reader.release(f"{old}.{suffix}")

    def encode(self, conv: Conversion) -> dict[str, torch.Tensor]:
        src = SourceWeight(self.reader.get, conv.prefix, conv.src_fmt, conv.shape, self.block)
        p = conv.prefix
        if conv.dst_fmt in TARGETS:
            return self.targets.encode(p, conv.src_fmt, conv.dst_fmt, conv.shape, self.out_buffer)
        if conv.dst_fmt == "bf16":
            out = self.out_buffer(conv.shape)
            return {f"{p}.weight": src.to_bf16(out=out, scratch=self.scratch(conv.shape[1]))}
        if conv.dst_fmt == "fp8":
            q, s = encode_fp8(src, self.opts.scale_fmt, BLOCK)
            return {f"{p}.weight": q, f"{p}.weight_scale_inv": s}
        packed, scale = encode_int4(
            src, self.opts.group_size, self.opts.int4_method, self.scratch(conv.shape[1])
        )
        return {
            f"{p}.weight_packed": packed,
            f"{p}.weight_scale": scale,
            f"{p}.weight_shape": torch.tensor(conv.shape, dtype=torch.int64),
        }


# ---- writing ---------------------------------------------------------------------------------------
def _streaming_writer(path: Path, shard: ShardPlan, produce: ConvertProducer, metadata: dict | None) -> int:
    """``writer.write_shard``'s bytes, streamed: byte copies file to file, encodes overlapped with I/O."""
    return write_shard_streaming(path, shard, produce, produce.locate, metadata, produce.prefetch)


# ---- the command -----------------------------------------------------------------------------------
def convert_job(model: str | Path, out: str | Path, opts: ConvertOptions) -> tuple[Checkpoint, WriteJob]:
    """Plan a conversion (validates the source; writes nothing)."""
    ck = Checkpoint(model)
    out = Path(out)
    if out.resolve() == ck.path.resolve():
        raise DSV3Error(f"--out {out} is the input folder; choose another --out")
    shards = plan_convert(ck, opts)
    qc = quantization_config(ck, opts)
    config = ck.config.to_dict(quantization_config=qc) if qc else ck.config.to_dict(quantization_config=None)
    if opts.to == "fp16":
        check_fp16_range(ck, tuple(ck.config.quant.block) if ck.config.quant.method == "fp8" else BLOCK)
        config["torch_dtype"] = "float16"
    options = dict(opts.relevant(), source=source_fingerprint(ck))
    job = WriteJob(
        out,
        shards,
        ConvertProducer(ck, opts),
        config,
        "convert",
        options,
        extra_files=non_weight_files(ck.path),
        shard_writer=_streaming_writer,
    )
    return ck, job


def plan_summary(ck: Checkpoint, job: WriteJob, opts: ConvertOptions) -> dict:
    """What a conversion would write: per output shard tensors and bytes, and the totals."""
    converted = {t.key.prefix for s in job.shards for t in s.tensors if isinstance(t.key, Conversion)}
    return {
        "model": str(ck.path),
        "out": str(job.out_dir),
        "options": opts.relevant(),
        "source_format": _source_format(ck),
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in job.shards],
        "num_shards": len(job.shards),
        "tensors": sum(len(s.tensors) for s in job.shards),
        "converted_linears": len(converted),
        "bytes_in": sum(i.nbytes for i in ck.infos().values()),
        "bytes_out": job.total_bytes,
        "quantization_config": quantization_config(ck, opts),
    }


def _source_format(ck: Checkpoint) -> str:
    infos = ck.infos()
    fmts = {float_format(infos, w.name) for w in ck.expected() if w.linear and w.quantizable}
    return fmts.pop() if len(fmts) == 1 else "mixed"


def convert(
    model: str | Path,
    out: str | Path,
    opts: ConvertOptions,
    workers: int = 1,
    part: tuple[int, int] | None = None,
    report: str | Path | None = None,
    dry_run: bool = False,
    on_shard: Callable[[ShardPlan, int], None] | None = None,
) -> dict:
    """Convert ``model`` into ``out``; returns the plan summary plus what was written (and the report)."""
    ck, job = convert_job(model, out, opts)
    if dry_run:
        return dict(plan_summary(ck, job, opts), dry_run=True)
    return run_job(ck, job, opts, workers, part, report, on_shard)


def run_job(
    ck: Checkpoint,
    job: WriteJob,
    opts: ConvertOptions,
    workers: int = 1,
    part: tuple[int, int] | None = None,
    report: str | Path | None = None,
    on_shard: Callable[[ShardPlan, int], None] | None = None,
) -> dict:
    """Write a planned conversion (resuming), then the report if asked and the folder is complete."""
    if workers < 1:
        raise DSV3Error(f"--workers {workers}: must be >= 1")
    result = plan_summary(ck, job, opts)
    res = execute(job, workers=workers, part=part, on_shard=on_shard)
    result.update(dry_run=False, written=res["written"], skipped=res["skipped"], complete=res["complete"])
    if report is not None and res["complete"]:
        rep = conversion_report(ck.path, job.out_dir, opts)
        Path(report).write_text(json.dumps(rep, indent=2) + "\n")
        result["report"] = {
            "file": str(report),
            "mean_rel_error": rep["mean_rel_error"],
            "mean_rel_error_by_format": rep["mean_rel_error_by_format"],
            "tensors": len(rep["tensors"]),
        }
    return result


def conversion_report(model: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """Relative error ``||w' - w|| / ||w||`` (float64; ``w`` the float32 source) of every re-encoded linear,
    read back from the written output, plus the mean (overall and per output format)."""
    src_ck, out_ck = Checkpoint(model), Checkpoint(out)
    src_io, out_io = ShardReader(src_ck.path, src_ck.infos()), ShardReader(out_ck.path, out_ck.infos())
    sopts = source_options(src_ck)
    src_block = tuple(src_ck.config.quant.block) if src_ck.config.quant.method == "fp8" else BLOCK
    entries = []
    for w in src_ck.expected():
        if not (w.linear and w.quantizable):
            continue
        sf, of = float_format(src_io.infos, w.name), float_format(out_io.infos, w.name)
        if is_copy(sf, of, sopts, opts):
            continue
        shape = (w.shape[0], w.shape[1])
        err = rel_error(
            SourceWeight(src_io.get, w.name, sf, shape, src_block),
            SourceWeight(out_io.get, w.name, of, shape, BLOCK),
        )
        entries.append({"name": w.name, "from": sf, "to": of, "rel_error": err})
    by_fmt: dict[str, list[float]] = {}
    for e in entries:
        by_fmt.setdefault(e["to"], []).append(e["rel_error"])
    mean = sum(e["rel_error"] for e in entries) / len(entries) if entries else 0.0
    return {
        "model": str(src_ck.path),
        "out": str(out_ck.path),
        "options": opts.relevant(),
        "source": sopts | {"block": list(src_block)},
        "mean_rel_error": mean,
        "mean_rel_error_by_format": {k: sum(v) / len(v) for k, v in by_fmt.items()},
        "tensors": entries,
    }
