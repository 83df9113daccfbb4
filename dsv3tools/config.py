"""The model configuration: one frozen object built from the checkpoint's own config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3tools.errors import DSV3Error

# field name -> python type; every one is required in a DeepSeek-V3 config.json
_REQUIRED: dict[str, type] = {
    "hidden_size": int,
    "intermediate_size": int,
    "moe_intermediate_size": int,
    "num_hidden_layers": int,
    "first_k_dense_replace": int,
    "n_routed_experts": int,
    "n_shared_experts": int,
    "num_experts_per_tok": int,
    "n_group": int,
    "topk_group": int,
    "routed_scaling_factor": float,
    "num_attention_heads": int,
    "kv_lora_rank": int,
    "qk_nope_head_dim": int,
    "qk_rope_head_dim": int,
    "v_head_dim": int,
    "vocab_size": int,
    "rms_norm_eps": float,
    "rope_theta": float,
    "max_position_embeddings": int,
}
_OPTIONAL: dict[str, Any] = {
    # Moonlight: null = no query compression (one ``self_attn.q_proj``); stored as 0
    "q_lora_rank": 0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "num_nextn_predict_layers": 0,
    "moe_layer_freq": 1,
    # DeepSeek-V3.2 (model_type deepseek_v32): the DSA lightning indexer (SPEC sec. 11); 0 = no indexer
    "index_n_heads": 0,
    "index_head_dim": 0,
    "index_topk": 0,
    "indexer_rope_interleave": False,
}
MODEL_TYPES = (None, "deepseek_v3", "deepseek_v32", "kimi_k2")
FAMILIES = ("v3", "v3.1", "v3.2", "kimi-k2", "kimi-k2-thinking", "moonlight")
# relatives of the architecture that are not in the family (SPEC sec. 10): model_type -> why
_NOT_FAMILY = {
    "deepseek_v2": "DeepSeek-V2/V2.5 (softmax routing without a correction bias)",
    "deepseek_v4": "DeepSeek-V4 (a different attention and residual design)",
    "mistral3": "Mistral Large 3 (Mistral-native tensor names)",
    "mistral_large_3": "Mistral Large 3 (Mistral-native tensor names)",
}


# compressed-tensors W4A16 formats -> our linear format name
_CT_FORMATS = {"pack-quantized": "int4", "nvfp4-pack-quantized": "nvfp4", "mxfp4-pack-quantized": "mxfp4"}


@dataclass(frozen=True)
class QuantConfig:
    """How the linears of a checkpoint are stored: ``fp8`` blocks, compressed-tensors ``int4`` / ``nvfp4`` /
    ``mxfp4``, or ``none``."""

    method: str = "none"
    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "float"
    group_size: int = 128
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, qc: dict | None, where: str) -> QuantConfig:
        if not qc:
            return cls()
        method = qc.get("quant_method")
        if method == "fp8":
            if qc.get("fmt", "e4m3") != "e4m3":
                raise DSV3Error(f"{where}: quantization_config.fmt {qc.get('fmt')!r} is not e4m3")
            block = tuple(qc.get("weight_block_size") or (128, 128))
            if len(block) != 2:
                raise DSV3Error(f"{where}: weight_block_size must have 2 entries, got {list(block)}")
            return cls("fp8", (int(block[0]), int(block[1])), qc.get("scale_fmt") or "float")
        if method == "compressed-tensors":
            groups = list((qc.get("config_groups") or {}).values())
            if not groups:
                raise DSV3Error(f"{where}: compressed-tensors quantization_config has no config_groups")
            w = groups[0].get("weights") or {}
            method = _CT_FORMATS.get(qc.get("format"))
            if w.get("num_bits") != 4 or method is None:
                raise DSV3Error(
                    f"{where}: compressed-tensors format {qc.get('format')!r} is not supported "
                    f"(use one of {', '.join(_CT_FORMATS)})"
                )
            return cls(method, group_size=int(w.get("group_size", 128)), ignore=tuple(qc.get("ignore") or ()))
        raise DSV3Error(f"{where}: unsupported quant_method {method!r} (expected fp8 or compressed-tensors)")


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 hyper-parameters (HF names) plus derived layer bookkeeping."""

    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    q_lora_rank: int = 0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 0
    moe_layer_freq: int = 1
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_rope_interleave: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    quant: QuantConfig = QuantConfig()
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ModelConfig:
        """Validate a config.json dict; errors name the file and the field."""
        arch = d.get("model_type")
        relative = not_family(d)
        if relative:
            raise DSV3Error(
                f"{where}: {relative} is not supported: dsv3tools handles the DeepSeek-V3 family "
                f"({', '.join(FAMILIES)}); point --model at one of those"
            )
        if arch not in MODEL_TYPES:
            raise DSV3Error(
                f"{where}: model_type is {arch!r}, not one of deepseek_v3, deepseek_v32, kimi_k2; "
                "point --model at a checkpoint of the DeepSeek-V3 family"
            )
        if arch == "deepseek_v32":
            missing_index = [k for k in ("index_n_heads", "index_head_dim", "index_topk") if not d.get(k)]
            if missing_index:
                raise DSV3Error(
                    f"{where}: a deepseek_v32 config needs {', '.join(missing_index)} (SPEC sec. 11)"
                )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise DSV3Error(f"{where}: not a DeepSeek-V3 config, missing {', '.join(missing)}")
        kw: dict[str, Any] = {}
        for k, typ in _REQUIRED.items():
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)):
                raise DSV3Error(f"{where}: {k} must be a number of type {typ.__name__}, got {v!r}")
            kw[k] = typ(v)
        for k, default in _OPTIONAL.items():
            v = d.get(k, default)
            kw[k] = default if v is None else type(default)(v)
        kw["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
        kw["quant"] = QuantConfig.from_dict(d.get("quantization_config"), where)
        cfg = cls(**kw, raw=dict(d))
        cfg._check(where)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise DSV3Error(f"{path}: no config.json; point --model at a checkpoint folder")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DSV3Error(f"{path}: not valid JSON ({e}); restore the checkpoint's config.json") from None
        if not isinstance(d, dict):
            raise DSV3Error(f"{path}: expected a JSON object")
        return cls.from_dict(d, str(path))

    def _check(self, where: str) -> None:
        rules = [
            (self.n_routed_experts % self.n_group == 0, "n_routed_experts must be a multiple of n_group"),
            (0 < self.topk_group <= self.n_group, "topk_group must be in 1..n_group"),
            (
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok must be in 1..n_routed_experts",
            ),
            (
                0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                "first_k_dense_replace must be <= num_hidden_layers",
            ),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
            (self.scoring_func == "sigmoid", "scoring_func must be sigmoid"),
            (self.topk_method == "noaux_tc", "topk_method must be noaux_tc"),
            (self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0"),
            (self.q_lora_rank >= 0, "q_lora_rank must be null or > 0"),
            (not self.has_indexer or self.q_lora_rank > 0, "a deepseek_v32 config needs q_lora_rank > 0"),
        ]
        for ok, rule in rules:
            if not ok:
                raise DSV3Error(f"{where}: {rule}")
        if self.has_indexer and not self.qk_rope_head_dim < self.index_head_dim:
            raise DSV3Error(f"{where}: index_head_dim must exceed qk_rope_head_dim (the indexer's rope part)")
        rs = self.rope_scaling_dict
        if rs and rs.get("type", rs.get("rope_type")) not in ("yarn", None):
            raise DSV3Error(f"{where}: rope_scaling type {rs.get('type')!r} is not yarn")

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def family(self) -> str:
        """The family member (SPEC sec. 10, the ``--family`` names) from model_type, fields and storage; a
        conversion keeps the member (Kimi-K2-Thinking converted to fp8 is still kimi-k2-thinking)."""
        arch = self.raw.get("model_type")
        if arch == "deepseek_v32" or self.has_indexer:
            return "v3.2"
        if arch == "kimi_k2":  # Thinking: rms_norm_eps 1e-5 (K2-Instruct 1e-6), released as int4 experts
            thinking = self.quant.method == "int4" or self.rms_norm_eps >= 1e-5
            return "kimi-k2-thinking" if thinking else "kimi-k2"
        if not self.q_lora_rank:
            return "moonlight"
        return "v3.1" if self.quant.scale_fmt == "ue8m0" else "v3"

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2: every layer (MTP included) has the DSA lightning indexer."""
        return self.index_n_heads > 0 and self.index_topk > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def mtp_layers(self) -> list[int]:
        """Layer ids of the multi-token-prediction modules: ``num_hidden_layers + k``."""
        return [self.num_hidden_layers + k for k in range(self.num_nextn_predict_layers)]

    @property
    def all_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers)) + self.mtp_layers

    def is_moe(self, layer: int) -> bool:
        """Whether a layer (main or MTP) has a routed-expert MLP."""
        if layer >= self.num_hidden_layers:
            return self.n_routed_experts > 0
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in self.all_layers if self.is_moe(layer)]

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5`` times the YaRN ``mscale**2`` correction (SPEC sec. 4)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling_dict
        if rs and rs.get("mscale_all_dim"):
            factor = float(rs["factor"])
            m = 0.1 * float(rs["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale *= m * m
        return scale

    def kv_cache_values_per_token_per_layer(self) -> int:
        """MLA's compressed cache (kv_lora_rank + qk_rope_head_dim) plus, on V3.2, the DSA indexer's keys
        (index_head_dim values per token per layer, cached beside the latent; SPEC sec. 11)."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.has_indexer else 0)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """The decode cache per token over the main layers (MLA latent + rope key, + indexer keys on V3.2)."""
        return self.kv_cache_values_per_token_per_layer() * self.num_hidden_layers * bytes_per_value

    @property
    def q_head_width(self) -> int:
        """Rows of the query projection: ``num_attention_heads * qk_head_dim``."""
        return self.num_attention_heads * self.qk_head_dim

    def to_dict(self, **overrides: Any) -> dict:
        """The original config.json dict with ``overrides`` applied (``None`` removes a key)."""
        d = dict(self.raw)
        for k, v in overrides.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        return d


def not_family(d: dict) -> str | None:
    """The name of an unsupported relative (DeepSeek-V2/V2.5, V4, Mistral Large 3) a config.json dict
    describes, from its model_type or architectures; None for anything else."""
    arch = str(d.get("model_type") or "")
    if arch in _NOT_FAMILY:
        return _NOT_FAMILY[arch]
    names = " ".join(str(a) for a in d.get("architectures") or ())
    for key, why in (("DeepseekV2", "deepseek_v2"), ("DeepseekV4", "deepseek_v4"), ("Mistral", "mistral3")):
        if key in names:
            return _NOT_FAMILY[why]
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else None
    return not_family(text) if text else None
