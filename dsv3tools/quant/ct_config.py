"""The compressed-tensors ``quantization_config`` of an int4 (``pack-quantized`` W4A16) checkpoint and its
``ignore`` list: one definition for ``convert --to int4`` and for synth's Kimi-K2-Thinking preset (whose
release stores its routed experts this way at group 32)."""

from __future__ import annotations

from dsv3tools.config import ModelConfig


def int4_ignore(cfg: ModelConfig, scope: str) -> list[str]:
    """compressed-tensors ``ignore`` entries: every Linear module left unquantized, matched the way vLLM
    matches them (``re:`` entries with ``re.match`` on the module name, fused modules by their parts)."""
    ignore = ["lm_head", r"re:.*mlp\.gate$", r"re:.*eh_proj$", r"re:.*shared_head\.head$"]
    if cfg.has_indexer:  # V3.2: the indexer's head weights stay bf16 (SPEC sec. 11)
        ignore.append(r"re:.*indexer\.weights_proj$")
    if scope == "experts":
        ignore += [r"re:.*self_attn.*", r"re:.*mlp\.shared_experts.*"]
        dense = [str(i) for i in range(cfg.num_hidden_layers) if not cfg.is_moe(i)]
        if dense:
            ignore.append(rf"re:model\.layers\.({'|'.join(dense)})\.mlp\..*")
    return ignore


def int4_quantization_config(group_size: int, method: str, ignore: list[str]) -> dict:
    """``quantization_config`` for symmetric int4 groups along the input dimension (``method`` rtn|mse is
    recorded as the observer)."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "mse" if method == "mse" else "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
