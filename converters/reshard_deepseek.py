"""``reshard --format deepseek``: what DeepSeek's own inference demo (github deepseek-ai/DeepSeek-V3,
``inference/convert.py`` + ``model.py``) loads: one ``model{r}-mp{N}.safetensors`` per rank with the demo's
short names, contiguous routed experts (rank r holds experts r*E/N .. (r+1)*E/N - 1), no redundant
experts, the MTP layer dropped, and a ``config_demo.json`` with the demo's ``ModelArgs`` fields.

Short names follow ``convert.py``: strip ``model.``, ``self_attn`` -> ``attn``, ``mlp`` -> ``ffn``,
``weight_scale_inv`` -> ``scale``, ``e_score_correction_bias`` -> ``bias``, then the module name through
``DEMO_NAMES``. Split dims are the same as ours (``reshard_rules``), which match the demo's mapping.
"""

from __future__ import annotations

from dsv3tools.config import ModelConfig

DEMO_NAMES = {
    "embed_tokens": "embed",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate": "gate",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "norm": "norm",
    "lm_head": "head",
}
_REVERSE = {v: k for k, v in DEMO_NAMES.items()}
# V3.2's convert.py keeps the DSA indexer's modules under their own names (``attn.indexer.wq_b`` ...)
INDEXER_MODULES = ("wq_b", "wk", "k_norm", "weights_proj")


def _is_indexer(parts: list[str]) -> bool:
    return len(parts) >= 3 and parts[-3] == "indexer" and parts[-2] in INDEXER_MODULES


def demo_name(hf_name: str) -> str:
    """HF tensor name -> the demo's short name (``model.layers.0.self_attn.q_b_proj.weight_scale_inv``
    -> ``layers.0.attn.wq_b.scale``)."""
    name = hf_name.removeprefix("model.")
    name = name.replace("self_attn", "attn").replace("mlp", "ffn")
    name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
    parts = name.split(".")
    if _is_indexer(parts):
        return name
    key = parts[-2]
    if key not in DEMO_NAMES:
        raise KeyError(f"{hf_name}: no short name in DeepSeek's demo for module {key!r}")
    parts[-2] = DEMO_NAMES[key]
    return ".".join(parts)


def hf_name(short: str) -> str:
    """The inverse of :func:`demo_name`."""
    parts = short.split(".")
    indexer = _is_indexer(parts)
    if not indexer:
        parts[-2] = _REVERSE[parts[-2]]
    if parts[-1] == "scale":
        parts[-1] = "weight_scale_inv"
    elif parts[-1] == "bias" and not indexer:
        parts[-1] = "e_score_correction_bias"
    name = ".".join(parts).replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
    return name if name.startswith("lm_head.") else "model." + name


def demo_config(cfg: ModelConfig) -> dict:
    """The demo's ``ModelArgs`` JSON (``generate.py --config``) for this checkpoint."""
    rs = cfg.rope_scaling_dict
    return {
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "inter_dim": cfg.intermediate_size,
        "moe_inter_dim": cfg.moe_intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_dense_layers": cfg.first_k_dense_replace,
        "n_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.num_experts_per_tok,
        "n_expert_groups": cfg.n_group,
        "n_limited_groups": cfg.topk_group,
        "route_scale": cfg.routed_scaling_factor,
        "score_func": cfg.scoring_func,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "dtype": "fp8" if cfg.quant.method == "fp8" else "bf16",
        "original_seq_len": int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings)),
        "rope_theta": cfg.rope_theta,
        "rope_factor": float(rs.get("factor", 1.0)),
        "beta_fast": int(rs.get("beta_fast", 32)),
        "beta_slow": int(rs.get("beta_slow", 1)),
        "mscale": float(rs.get("mscale", 1.0)),
        **_v32_fields(cfg),
    }


def _v32_fields(cfg: ModelConfig) -> dict:
    """The V3.2 demo's extra ``ModelArgs`` (config_671B_v3.2.json): scale format and the indexer sizes."""
    if not cfg.has_indexer:
        return {}
    out = {
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
    }
    if cfg.quant.method == "fp8" and cfg.quant.scale_fmt != "float":
        out["scale_fmt"] = cfg.quant.scale_fmt
    return out


def contiguous_phy2log(num_experts: int) -> list[int]:
    """The demo's placement: slot p holds expert p (rank r owns experts r*E/N ..)."""
    return list(range(num_experts))
