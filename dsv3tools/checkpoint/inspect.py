"""``inspect``: what is in a checkpoint, from headers only (no tensor data is read)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from dsv3tools.checkpoint.layout import model_weights, nbytes, storage
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.config import ModelConfig

GPU_COUNTS = (1, 8, 16, 32, 64, 128, 320)
COMPONENTS = (
    "embed",
    "attention",
    "indexer",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "router",
    "norm",
    "head",
    "mtp",
)


def weight_bytes(cfg: ModelConfig, fmt: str, int4_scope: str = "experts", group: int = 128) -> int:
    """Bytes of all weights if the linears were stored as ``fmt`` (int4: only ``int4_scope`` linears)."""
    total = 0
    for w in model_weights(cfg):
        f = fmt
        if (
            fmt == "int4"
            and int4_scope == "experts"
            and w.component not in ("routed_experts",)
            and not (w.component == "mtp" and ".mlp.experts." in w.name)
        ):
            f = "bf16"
        total += sum(nbytes(dt, sh) for dt, sh in storage(w, f, cfg.quant.block, group).values())
    return total


def memory_table(cfg: ModelConfig) -> dict[str, dict]:
    """Weight bytes per format, and per GPU for each GPU count (an even split, weights only)."""
    group = cfg.quant.group_size if cfg.quant.method == "int4" else 128
    formats = {
        "fp8": weight_bytes(cfg, "fp8"),
        "bf16": weight_bytes(cfg, "bf16"),
        "int4_experts": weight_bytes(cfg, "int4", "experts", group),
        "int4_all": weight_bytes(cfg, "int4", "all", group),
    }
    return {
        fmt: {"total_bytes": b, "per_gpu_bytes": {str(n): -(-b // n) for n in GPU_COUNTS}}
        for fmt, b in formats.items()
    }


def inspect_checkpoint(path: str | Path) -> dict:
    """The inspect report (SPEC sec. 2) as a JSON-able dict."""
    ck = Checkpoint(path, validate=False)  # the inventory's problems are part of the report
    cfg = ck.config
    infos = ck.infos()
    problems = ck.problems()
    params: Counter = Counter()
    fmt_groups: dict[str, Counter] = defaultdict(Counter)
    p_main = p_mtp = p_mtp_copies = 0
    for w in ck.expected():
        fmt = ck.linear_format(w.name) if w.linear else None
        names = list(storage(w, fmt or "bf16").keys()) if w.linear else [w.name]
        if not all(n in infos for n in names):
            continue
        params[w.component] += w.numel
        if w.layer is not None and w.layer >= cfg.num_hidden_layers:
            p_mtp += w.numel
            p_mtp_copies += (
                w.numel if w.name.endswith(("embed_tokens.weight", "shared_head.head.weight")) else 0
            )
        else:
            p_main += w.numel
        group = "linear" if w.linear and w.quantizable else ("unquantized_linear" if w.linear else "tensor")
        fmt_groups[w.component][f"{group}:{fmt or infos[names[0]].dtype}"] += 1
    linear_formats = {k.split(":")[1] for c in fmt_groups.values() for k in c if k.startswith("linear:")}
    fmt = linear_formats.pop() if len(linear_formats) == 1 else ("mixed" if linear_formats else "none")
    files = [ck.path / s for s in ck.shards]
    return {
        "path": str(ck.path),
        "family": cfg.family,
        "model_type": cfg.raw.get("model_type"),
        "format": fmt,
        "quantization": cfg.quant.method,
        "scale_fmt": cfg.quant.scale_fmt if cfg.quant.method == "fp8" else None,
        "params_total": p_main + p_mtp,
        "params_main": p_main,
        "params_mtp": p_mtp,
        "params_mtp_unique": p_mtp - p_mtp_copies,
        "bytes_total": sum(i.nbytes for i in infos.values()),
        "file_bytes": sum(f.stat().st_size for f in files),
        "num_tensors": len(infos),
        "num_shards": len(ck.shards),
        "num_layers": cfg.num_hidden_layers,
        "mtp_layers": cfg.mtp_layers,
        "components": {
            c: {"params": params[c], "formats": dict(fmt_groups[c])} for c in COMPONENTS if params[c]
        },
        "memory": memory_table(cfg),
        "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(),
        "kv_cache_values_per_token_per_layer": cfg.kv_cache_values_per_token_per_layer(),
        "problems": problems,
    }
