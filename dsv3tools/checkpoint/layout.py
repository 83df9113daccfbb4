"""The tensor layout of a DeepSeek-V3 checkpoint: which logical weights exist, their shapes, and how each
storage format names them on disk (HF names). The one mapping table from logical weights to files."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from dsv3tools.config import ModelConfig

# safetensors dtype tags and their sizes
DTYPE_BYTES = {
    "F8_E4M3": 1,
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}
FORMATS = ("fp8", "bf16", "fp16", "int4", "nvfp4", "mxfp4")
# the tensors a linear module may store under its prefix, over all formats
TENSOR_SUFFIXES = (
    "weight",
    "weight_scale_inv",
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_global_scale",
)
FP4_GROUPS = {"nvfp4": 16, "mxfp4": 32}  # compressed-tensors NVFP4A16 / MXFP4A16 group sizes
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Weight:
    """One logical weight. ``name`` is the module prefix for linears (``...q_a_proj``) and the full
    tensor name otherwise. ``quantizable`` linears are stored as FP8 blocks in the release."""

    name: str
    shape: tuple[int, ...]
    component: str
    layer: int | None = None
    linear: bool = False
    quantizable: bool = False
    dtype: str = "BF16"  # on-disk dtype of a non-quantized tensor in the release

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layer_of(name: str) -> int | None:
    """``model.layers.L.…`` -> L; None for embed, final norm and head."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> int | None:
    """Routed expert index of a tensor name, or None."""
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else None


def _lin(name: str, out: int, inp: int, comp: str, layer: int | None, quantizable: bool = True) -> Weight:
    return Weight(name, (out, inp), comp, layer, linear=True, quantizable=quantizable)


def _mlp(prefix: str, inter: int, hidden: int, comp: str, layer: int) -> list[Weight]:
    return [
        _lin(f"{prefix}.gate_proj", inter, hidden, comp, layer),
        _lin(f"{prefix}.up_proj", inter, hidden, comp, layer),
        _lin(f"{prefix}.down_proj", hidden, inter, comp, layer),
    ]


def layer_weights(cfg: ModelConfig, layer: int) -> list[Weight]:
    """All logical weights of decoder layer ``layer`` (an MTP layer includes its extras)."""
    p = f"model.layers.{layer}"
    h = cfg.hidden_size
    mtp = layer >= cfg.num_hidden_layers
    att = "mtp" if mtp else "attention"
    nh = cfg.num_attention_heads
    ws = [
        *query_weights(cfg, layer, att),
        _lin(f"{p}.self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h, att, layer),
        Weight(f"{p}.self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,), att, layer),
        _lin(
            f"{p}.self_attn.kv_b_proj",
            nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
            att,
            layer,
        ),
        _lin(f"{p}.self_attn.o_proj", h, nh * cfg.v_head_dim, att, layer),
        Weight(f"{p}.input_layernorm.weight", (h,), att, layer),
        Weight(f"{p}.post_attention_layernorm.weight", (h,), att, layer),
    ]
    ws += indexer_weights(cfg, layer)
    if not cfg.is_moe(layer):
        ws += _mlp(f"{p}.mlp", cfg.intermediate_size, h, "dense_mlp", layer)
    else:
        e = cfg.n_routed_experts
        ws.append(Weight(f"{p}.mlp.gate.weight", (e, h), "mtp" if mtp else "router", layer))
        ws.append(
            Weight(
                f"{p}.mlp.gate.e_score_correction_bias", (e,), "mtp" if mtp else "router", layer, dtype="F32"
            )
        )
        for j in range(e):
            ws += _mlp(
                f"{p}.mlp.experts.{j}",
                cfg.moe_intermediate_size,
                h,
                "mtp" if mtp else "routed_experts",
                layer,
            )
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            ws += _mlp(f"{p}.mlp.shared_experts", inter, h, "mtp" if mtp else "shared_experts", layer)
    if mtp:
        ws += [
            Weight(f"{p}.embed_tokens.weight", (cfg.vocab_size, h), "mtp", layer),
            Weight(f"{p}.enorm.weight", (h,), "mtp", layer),
            Weight(f"{p}.hnorm.weight", (h,), "mtp", layer),
            _lin(f"{p}.eh_proj", h, 2 * h, "mtp", layer, quantizable=False),
            Weight(f"{p}.shared_head.norm.weight", (h,), "mtp", layer),
            Weight(f"{p}.shared_head.head.weight", (cfg.vocab_size, h), "mtp", layer),
        ]
    return _float32_norms(cfg, ws)


def query_weights(cfg: ModelConfig, layer: int, comp: str) -> list[Weight]:
    """The query projection: compressed (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``) or, with
    ``q_lora_rank`` null (Moonlight), one ``q_proj`` from the hidden state."""
    p = f"model.layers.{layer}.self_attn"
    if not cfg.q_lora_rank:
        return [_lin(f"{p}.q_proj", cfg.q_head_width, cfg.hidden_size, comp, layer)]
    return [
        _lin(f"{p}.q_a_proj", cfg.q_lora_rank, cfg.hidden_size, comp, layer),
        Weight(f"{p}.q_a_layernorm.weight", (cfg.q_lora_rank,), comp, layer),
        _lin(f"{p}.q_b_proj", cfg.q_head_width, cfg.q_lora_rank, comp, layer),
    ]


def model_weights(cfg: ModelConfig) -> list[Weight]:
    """Every logical weight in checkpoint order: embed, layers 0..N-1, norm, head, then the MTP layers
    (so that, as in the release, the MTP module sits in the last shards)."""
    ws = [Weight("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), "embed")]
    for layer in range(cfg.num_hidden_layers):
        ws += layer_weights(cfg, layer)
    ws.append(Weight("model.norm.weight", (cfg.hidden_size,), "norm"))
    ws.append(Weight("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), "head"))
    for layer in cfg.mtp_layers:
        ws += layer_weights(cfg, layer)
    return _float32_norms(cfg, ws)


# ---- DeepSeek-V3.2 (SPEC sec. 10, 11): the DSA lightning indexer of every layer, float32 norms -------------
def indexer_weights(cfg: ModelConfig, layer: int) -> list[Weight]:
    """The seven stored tensors of layer ``layer``'s indexer (none without one): ``wq_b`` and ``wk`` are FP8
    linears, ``weights_proj`` a bf16 linear never quantized, ``k_norm`` a float32 LayerNorm."""
    if not cfg.has_indexer:
        return []
    p = f"model.layers.{layer}.self_attn.indexer"
    comp = "mtp" if layer >= cfg.num_hidden_layers else "indexer"
    d = cfg.index_head_dim
    return [
        _lin(f"{p}.wq_b", cfg.index_n_heads * d, cfg.q_lora_rank, comp, layer),
        _lin(f"{p}.wk", d, cfg.hidden_size, comp, layer),
        Weight(f"{p}.k_norm.weight", (d,), comp, layer, dtype="F32"),
        Weight(f"{p}.k_norm.bias", (d,), comp, layer, dtype="F32"),
        _lin(f"{p}.weights_proj", cfg.index_n_heads, cfg.hidden_size, comp, layer, quantizable=False),
    ]


def _float32_norms(cfg: ModelConfig, ws: list[Weight]) -> list[Weight]:
    """V3.2 stores every RMSNorm weight in float32 (V3: bf16)."""
    if not cfg.has_indexer:
        return ws
    return [replace(w, dtype="F32") if w.name.endswith("norm.weight") and not w.linear else w for w in ws]


def storage(
    w: Weight, fmt: str, block: tuple[int, int] = (128, 128), group: int = 128
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """On-disk tensors of a logical weight in a storage format: ``{tensor name: (dtype, shape)}``.

    ``fmt`` is the weight's own format: ``fp8`` (codes + ``weight_scale_inv`` grid), ``int4``
    (compressed-tensors ``weight_packed``/``weight_scale``/``weight_shape``), ``nvfp4`` / ``mxfp4``
    (compressed-tensors ``weight_packed`` uint8 + ``weight_scale`` e4m3 / e8m0, NVFP4 also
    ``weight_global_scale``), ``bf16`` or ``fp16``.
    """
    if not w.linear or fmt in ("bf16", "fp16") or not w.quantizable:
        name = w.name if not w.linear else f"{w.name}.weight"
        if fmt == "fp16":
            dtype = "F16" if w.linear or w.dtype == "BF16" else w.dtype
        else:
            dtype = "BF16" if w.linear else w.dtype
        return {name: (dtype, w.shape)}
    out, inp = w.shape
    if fmt in FP4_GROUPS:
        specs = {
            f"{w.name}.weight_packed": ("U8", (out, inp // 2)),
            f"{w.name}.weight_scale": ("F8_E4M3" if fmt == "nvfp4" else "U8", (out, inp // FP4_GROUPS[fmt])),
        }
        if fmt == "nvfp4":
            specs[f"{w.name}.weight_global_scale"] = ("F32", (1,))
        return specs
    if fmt == "fp8":
        return {
            f"{w.name}.weight": ("F8_E4M3", w.shape),
            f"{w.name}.weight_scale_inv": ("F32", (-(-out // block[0]), -(-inp // block[1]))),
        }
    if fmt == "int4":
        return {
            f"{w.name}.weight_packed": ("I32", (out, inp // 8)),
            f"{w.name}.weight_scale": ("BF16", (out, inp // group)),
            f"{w.name}.weight_shape": ("I64", (2,)),
        }
    raise ValueError(f"unknown weight format {fmt!r}")


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def detect_format(names: set[str] | dict, prefix: str) -> str | None:
    """Storage format of the linear ``prefix`` from the tensor names present, or None if absent."""
    if f"{prefix}.weight_packed" in names:
        if f"{prefix}.weight_global_scale" in names:
            return "nvfp4"
        return "int4" if f"{prefix}.weight_shape" in names else "mxfp4"
    if f"{prefix}.weight_scale_inv" in names:
        return "fp8"
    if f"{prefix}.weight" in names:
        return "bf16"
    return None
