"""Synthetic checkpoints in the exact HF DeepSeek-V3 format, deterministic per seed.

Presets: ``tiny`` (CI, a few MB), ``small`` (forward benchmarks), ``real-shape`` (every tensor at its
real shape, layer/expert counts cut by ``layers``/``experts``) and ``full`` (the whole release;
``sparse=True`` leaves every data region a hole so 688 GB of shards take almost no disk).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from dsv3tools.checkpoint.layout import Weight, model_weights, storage
from dsv3tools.checkpoint.tokenizer import tokenizer_files
from dsv3tools.checkpoint.writer import TORCH_DTYPES, OutSpec, WriteJob, execute, plan_shards
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.reference import fp8_block_quant

REAL_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "vocab_size": 129280,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "num_nextn_predict_layers": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}

# scaled-down presets keep the real block size (128) so ragged scale grids and int4 groups occur
PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "vocab_size": 512,
        "max_position_embeddings": 5120,
        "rope_scaling": dict(REAL_CONFIG["rope_scaling"], original_max_position_embeddings=128),
    },
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "vocab_size": 4096,
        "max_position_embeddings": 32768,
        "rope_scaling": dict(REAL_CONFIG["rope_scaling"], original_max_position_embeddings=1024),
    },
}
# DeepSeek-V3.2 (SPEC sec. 10, 11): what the family member changes on top of each preset; the indexer of the
# scaled-down presets keeps index_head_dim a power of two (the fp8 scoring's Hadamard) above the rope part,
# enough indexer heads that exact score ties are rare, and an index_topk below the test sequence lengths
V32_CONFIG: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
}
V32_PRESETS: dict[str, dict] = {
    "tiny": {"index_n_heads": 16, "index_head_dim": 64, "index_topk": 64},
    "small": {"index_n_heads": 16, "index_head_dim": 128, "index_topk": 512},
}
FAMILIES = ("v3", "v3.2")
SHARD_CAP = {"tiny": 2 * 10**6, "small": 100 * 10**6, "real-shape": 4 * 10**9, "full": 4_250_000_000}


def preset_config(
    preset: str,
    layers: int | None = None,
    experts: int | None = None,
    dtype: str = "fp8",
    family: str = "v3",
) -> dict:
    """The config.json dict of a preset (``layers``/``experts`` cut the counts; ``full`` refuses cuts)."""
    if preset not in (*PRESETS, "real-shape", "full"):
        raise DSV3Error(f"unknown preset {preset!r}; use tiny, small, real-shape or full")
    if family not in FAMILIES:
        raise DSV3Error(f"unknown --family {family!r}; use one of {', '.join(FAMILIES)}")
    cfg = dict(REAL_CONFIG, **PRESETS.get(preset, {}))
    if family == "v3.2":
        cfg.update(V32_CONFIG, **V32_PRESETS.get(preset, {}))
        cfg["quantization_config"] = dict(cfg["quantization_config"], scale_fmt="ue8m0")
    if preset == "full" and (layers or experts):
        raise DSV3Error(
            "--preset full is the complete release; use --preset real-shape with --layers/--experts"
        )
    if preset == "real-shape":
        layers = layers or 4
        experts = experts or 16
    if layers is not None:
        if layers < 1:
            raise DSV3Error(f"--layers {layers}: need at least 1 layer")
        cfg["num_hidden_layers"] = layers
        cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], max(layers - 1, 0))
    if experts is not None:
        if experts < 1 or experts % cfg["n_group"]:
            raise DSV3Error(f"--experts {experts}: must be a positive multiple of n_group ({cfg['n_group']})")
        cfg["n_routed_experts"] = experts
        cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], experts)
    if dtype == "bf16":
        cfg.pop("quantization_config")
    elif dtype != "fp8":
        raise DSV3Error(f"--dtype {dtype!r}: use fp8 or bf16")
    return cfg


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


class _SynthProducer:
    """Produces each output tensor on demand; an FP8 weight and its scale come from one quantization."""

    def __init__(self, weights: dict[str, Weight], seed: int, sparse: bool, scale_fmt: str = "float"):
        self.weights, self.seed, self.sparse, self.scale_fmt = weights, seed, sparse, scale_fmt
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, spec: OutSpec) -> torch.Tensor | None:
        if self.sparse:
            return None
        w = self.weights[spec.key]
        if spec.dtype in ("F8_E4M3",) or spec.name.endswith("weight_scale_inv"):
            if self._cache is None or self._cache[0] != w.name:
                self._cache = (w.name, fp8_block_quant(random_weight(w, self.seed), scale_fmt=self.scale_fmt))
            q, s = self._cache[1]
            return q if spec.dtype == "F8_E4M3" else s
        return random_weight(w, self.seed).to(TORCH_DTYPES[spec.dtype])


def synthesize(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    sparse: bool = False,
    dtype: str = "fp8",
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
    fmt = "fp8" if dtype == "fp8" else "bf16"
    weights = model_weights(cfg)
    specs = [
        OutSpec(name, dt, shape, key=w.name) for w in weights for name, (dt, shape) in storage(w, fmt).items()
    ]
    shards = plan_shards(specs, max_shard_bytes or SHARD_CAP[preset])
    out = Path(out_dir)
    job = WriteJob(
        out,
        shards,
        _SynthProducer({w.name: w for w in weights}, seed, sparse, cfg.quant.scale_fmt),
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
    job.extra_data = tokenizer_files(real=preset in ("real-shape", "full"))
    result = execute(job)
    return {"out": str(out), "tensors": len(specs), "bytes": job.total_bytes, "shards": len(shards), **result}
