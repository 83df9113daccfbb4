"""The synth presets: the real DeepSeek-V3 config.json, its scaled-down presets, and what each family member
(SPEC sec. 10) changes on top of them, as config.json dicts. :func:`preset_config` combines the three;
``synth`` writes checkpoints from them and the benchmarks build configs from them. Every number here is a
fact about a release (or a scaled-down CI shape); code reads them only through the config they produce."""

from __future__ import annotations

import copy

from dsv3tools.config import FAMILIES, ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.ct_config import int4_ignore, int4_quantization_config

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
SHARD_CAP = {"tiny": 2 * 10**6, "small": 100 * 10**6, "real-shape": 4 * 10**9, "full": 4_250_000_000}


# Kimi-K2 (moonshotai/Kimi-K2-Instruct config.json): 384 experts in one group, 64 heads, YaRN with betas 1/1,
# a 163840-token tiktoken vocabulary and no MTP layer
KIMI_K2_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "routed_scaling_factor": 2.827,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 131072,
    "vocab_size": 163840,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "num_nextn_predict_layers": 0,
}
# Kimi-K2-Thinking: YaRN factor 64, rms_norm_eps 1e-5; routed experts int4 group 32, everything else BF16
KIMI_K2_THINKING_CONFIG: dict = {
    **KIMI_K2_CONFIG,
    "rope_scaling": {**KIMI_K2_CONFIG["rope_scaling"], "factor": 64.0},
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
}
# Moonlight-16B-A3B: no query compression, 2 shared experts, 64 experts top-6 in one group, no YaRN, BF16
MOONLIGHT_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.446,
    "rope_theta": 50000.0,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "vocab_size": 163840,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "num_nextn_predict_layers": 0,
}
FAMILY_CONFIG: dict[str, dict] = {
    "v3": {},
    "v3.1": {},
    "v3.2": V32_CONFIG,
    "kimi-k2": KIMI_K2_CONFIG,
    "kimi-k2-thinking": KIMI_K2_THINKING_CONFIG,
    "moonlight": MOONLIGHT_CONFIG,
}


def _scaled(member: dict, preset: str, **extra) -> dict:
    """A member's choices on a scaled-down preset: one expert group, its own YaRN betas (or none), and the
    synthetic tiktoken vocabulary's ids (tokenizer.TIKTOKEN_TINY: 320 base tokens + 256 specials)."""
    orig = PRESETS[preset]["rope_scaling"]["original_max_position_embeddings"]
    rs = member.get("rope_scaling")
    return {
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": None if rs is None else dict(rs, original_max_position_embeddings=orig),
        "vocab_size": max(576, PRESETS[preset]["vocab_size"]),
        "bos_token_id": 320,
        "eos_token_id": 321,
        **extra,
    }


# (member, preset) -> what the member changes on a scaled-down preset, applied after the preset's shape
FAMILY_PRESETS: dict[tuple[str, str], dict] = {
    **{("v3.2", p): v for p, v in V32_PRESETS.items()},
    **{
        (m, p): _scaled(FAMILY_CONFIG[m], p, n_routed_experts=24 if p == "tiny" else 96)
        for m in ("kimi-k2", "kimi-k2-thinking")
        for p in PRESETS
    },
    **{
        ("moonlight", p): _scaled(
            MOONLIGHT_CONFIG, p, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=6
        )
        for p in PRESETS
    },
}
# what a member's release stores its linears as (synth's default --dtype)
RELEASE_DTYPE = {"kimi-k2-thinking": "int4", "moonlight": "bf16"}
INT4_GROUP = 32  # Kimi-K2-Thinking's compressed-tensors group size
# the tokenizer kind each member ships (SPEC sec. 10): tiktoken.model + tokenizer_config.json, else tokenizer.json
TIKTOKEN_MEMBERS = ("kimi-k2", "kimi-k2-thinking", "moonlight")
DTYPES = ("fp8", "bf16", "int4")


def _member_config(preset: str, family: str) -> dict:
    """REAL_CONFIG, the member's changes, the preset's scaled-down shape, then the member's changes for that
    preset; keys left None (Moonlight's rope_scaling) are removed, except q_lora_rank (null is its value)."""
    cfg = copy.deepcopy({**REAL_CONFIG, **FAMILY_CONFIG[family], **PRESETS.get(preset, {})})
    cfg.update(copy.deepcopy(FAMILY_PRESETS.get((family, preset), {})))
    if family in ("v3.1", "v3.2"):
        cfg["quantization_config"] = dict(cfg["quantization_config"], scale_fmt="ue8m0")
    for k in [k for k, v in cfg.items() if v is None and k != "q_lora_rank"]:
        del cfg[k]
    return cfg


def preset_config(
    preset: str,
    layers: int | None = None,
    experts: int | None = None,
    dtype: str | None = None,
    family: str = "v3",
) -> dict:
    """The config.json dict of a preset (``layers``/``experts`` cut the counts; ``full`` refuses cuts).
    ``dtype`` None: how the member's release stores its linears (fp8; Moonlight bf16; Kimi-K2-Thinking int4
    routed experts at group 32 with everything else bf16)."""
    if preset not in (*PRESETS, "real-shape", "full"):
        raise DSV3Error(f"unknown preset {preset!r}; use tiny, small, real-shape or full")
    if family not in FAMILIES:
        raise DSV3Error(f"unknown --family {family!r}; use one of {', '.join(FAMILIES)}")
    cfg = _member_config(preset, family)
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
    dtype = dtype or RELEASE_DTYPE.get(family, "fp8")
    if dtype == "bf16":
        cfg.pop("quantization_config")
    elif dtype == "int4":
        cfg["quantization_config"] = int4_quantization_config(
            INT4_GROUP, "rtn", int4_ignore(_cfg(cfg), "experts")
        )
    elif dtype != "fp8":
        raise DSV3Error(f"--dtype {dtype!r}: use {' | '.join(DTYPES)}")
    return cfg


def _cfg(d: dict) -> ModelConfig:
    return ModelConfig.from_dict({k: v for k, v in d.items() if k != "quantization_config"})
