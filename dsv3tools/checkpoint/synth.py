"""Synthetic checkpoints in the exact HF format of a family member (SPEC sec. 3, 10), deterministic per seed.
The configs come from :mod:`dsv3tools.checkpoint.presets`; this module writes their tensors.

Presets: ``tiny`` (CI, a few MB), ``small`` (forward benchmarks), ``real-shape`` (every tensor at its
real shape, layer/expert counts cut by ``layers``/``experts``) and ``full`` (the whole release;
``sparse=True`` leaves every data region a hole so 688 GB of shards take almost no disk).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from dsv3tools.checkpoint.layout import Weight, model_weights, storage
from dsv3tools.checkpoint.presets import SHARD_CAP, TIKTOKEN_MEMBERS, preset_config
from dsv3tools.checkpoint.tokenizer import tokenizer_files
from dsv3tools.checkpoint.writer import TORCH_DTYPES, OutSpec, WriteJob, execute, plan_shards
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.reference import fp8_block_quant, int4_pack, int4_quant

__all__ = ["preset_config", "random_weight", "synthesize", "weight_format"]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_weight(w: Weight, seed: int) -> torch.Tensor:
    """Deterministic float32 values for a logical weight (scaled so a forward stays well conditioned)."""
    g = _generator(seed, w.name)
    if w.name.endswith(("e_score_correction_bias", "k_norm.bias")):
        return torch.randn(w.shape, generator=g) * 0.1
    if len(w.shape) == 1:
        return 1.0 + 0.1 * torch.randn(w.shape, generator=g)
    if "embed_tokens" in w.name:
        return torch.randn(w.shape, generator=g)
    return torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5


def weight_format(cfg: ModelConfig, w: Weight) -> str:
    """How the checkpoint described by ``cfg`` stores the linear ``w``: its quantization method for the
    linears it covers (int4: the routed experts, as Kimi-K2-Thinking), bf16 for the rest."""
    method = cfg.quant.method
    if method == "int4":
        return "int4" if ".mlp.experts." in w.name else "bf16"
    return "fp8" if method == "fp8" else "bf16"


class _SynthProducer:
    """Produces each output tensor on demand; a quantized weight and its scales come from one quantization."""

    def __init__(self, weights: dict[str, Weight], seed: int, sparse: bool, cfg: ModelConfig):
        self.weights, self.seed, self.sparse = weights, seed, sparse
        self.scale_fmt, self.group = cfg.quant.scale_fmt, cfg.quant.group_size
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    def _quantized(self, w: Weight, fp8: bool) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != w.name:
            x = random_weight(w, self.seed)
            if fp8:
                q, s = fp8_block_quant(x, scale_fmt=self.scale_fmt)
                parts = {"weight": q, "weight_scale_inv": s}
            else:
                q, s = int4_quant(x, self.group)
                shape = torch.tensor(list(w.shape), dtype=torch.int64)
                parts = {"weight_packed": int4_pack(q), "weight_scale": s, "weight_shape": shape}
            self._cache = (w.name, parts)
        return self._cache[1]

    def __call__(self, spec: OutSpec) -> torch.Tensor | None:
        if self.sparse:
            return None
        w = self.weights[spec.key]
        suffix = spec.name.rpartition(".")[2]
        if w.linear and (spec.dtype == "F8_E4M3" or suffix == "weight_scale_inv"):
            return self._quantized(w, fp8=True)[suffix]
        if w.linear and suffix in ("weight_packed", "weight_scale", "weight_shape"):
            return self._quantized(w, fp8=False)[suffix]
        return random_weight(w, self.seed).to(TORCH_DTYPES[spec.dtype])


def synthesize(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    sparse: bool = False,
    dtype: str | None = None,
    layers: int | None = None,
    experts: int | None = None,
    max_shard_bytes: int | None = None,
    overrides: dict | None = None,
    family: str = "v3",
) -> dict:
    """Write a synthetic checkpoint; returns a summary (tensors, bytes, shards). ``overrides`` replaces
    config.json fields of the preset (e.g. more heads for tensor-parallel tests)."""
    if sparse and preset != "full":
        raise DSV3Error("--sparse is only for --preset full (the other presets hold real random data)")
    cfg_dict = {**preset_config(preset, layers, experts, dtype, family), **(overrides or {})}
    cfg = ModelConfig.from_dict(cfg_dict)
    weights = model_weights(cfg)
    specs = [
        OutSpec(name, dt, shape, key=w.name)
        for w in weights
        for name, (dt, shape) in storage(w, weight_format(cfg, w), group=cfg.quant.group_size).items()
    ]
    shards = plan_shards(specs, max_shard_bytes or SHARD_CAP[preset])
    out = Path(out_dir)
    job = WriteJob(
        out,
        shards,
        _SynthProducer({w.name: w for w in weights}, seed, sparse, cfg),
        cfg_dict,
        "synth",
        {
            "preset": preset,
            "seed": seed,
            "sparse": sparse,
            "dtype": dtype,
            "layers": layers,
            "experts": experts,
            "family": family,
        },
    )
    job.sparse = sparse
    kind = "tiktoken" if family in TIKTOKEN_MEMBERS else "tokenizer.json"
    job.extra_data = tokenizer_files(real=preset in ("real-shape", "full"), kind=kind)
    result = execute(job)
    return {"out": str(out), "tensors": len(specs), "bytes": job.total_bytes, "shards": len(shards), **result}
