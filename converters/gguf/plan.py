"""The GGUF export plan and its one name table: which GGUF architecture a checkpoint becomes, which GGUF
tensors, their numpy shapes and GGML types, and where each one's values come from.

The name table is gguf's own ``TensorNameMap`` for the architecture (:func:`name_map`). The installed gguf
(PyPI 0.19) has no ``deepseek32`` architecture and lists neither the DSA indexer tensors nor the MTP
``nextn`` tensors under ``deepseek2``; :data:`DEEPSEEK2` and :data:`DEEPSEEK32` name those tensors (gguf's
``MODEL_TENSOR`` members, mapped through gguf's own HF patterns), the architecture name and its extra
metadata keys, so the exporter spells no GGUF name anywhere else. HF names map to GGUF names with the two reshapes
llama.cpp's ``DeepseekV2Model`` applies: ``kv_b_proj`` split per head into ``attn_k_b`` (k_nope rows,
transposed: ``[heads, kv_lora_rank, qk_nope]``) and ``attn_v_b`` (``[heads, v_head_dim, kv_lora_rank]``),
and each layer's routed experts stacked into ``ffn_{gate,up,down}_exps`` (``[experts, out, in]``), filled
expert by expert at write time.

MTP: llama.cpp's ``deepseek2`` converter drops the MTP layers, its ``deepseek32`` converter keeps them as
``blk.N`` with the ``nextn.*`` extras (``--no-mtp`` drops them); ``GGUFOptions.mtp`` None follows that
default, True / False force it.

Types follow the converter: 1-D tensors, ``*_norm.weight``, anything not named ``.weight``, the router
``ffn_gate_inp`` and the indexer's ``indexer.proj`` are F32; every other tensor takes the chosen type, or the
type of the first ``--gguf-tensor-type REGEX=TYPE`` whose regex matches its GGUF name. A tensor whose row
length the chosen block type cannot divide falls back as llama.cpp falls back (``llama-quantize``'s
``tensor_type_fallback`` and the converter's ``QuantError`` handler): every type offered here has 32-value
blocks, below which there is no smaller block to demote to, so the fallback is F16. (SPEC sec. 12 says
"q8_0, then bf16": q8_0 has the same 32-value block, and llama.cpp writes F16, which the parity tests pin.)"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from dsv3tools.checkpoint.layout import Weight, model_weights
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error

T = gguf.MODEL_TENSOR
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
}
FILE_TYPES = {
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
}
FALLBACK = "f16"  # what llama.cpp writes for a row its 32-value block type cannot divide
NEXTN = (
    T.NEXTN_EH_PROJ,
    T.NEXTN_EMBED_TOKENS,
    T.NEXTN_ENORM,
    T.NEXTN_HNORM,
    T.NEXTN_SHARED_HEAD_HEAD,
    T.NEXTN_SHARED_HEAD_NORM,
)
INDEXER = (T.INDEXER_K_NORM, T.INDEXER_PROJ, T.INDEXER_ATTN_K, T.INDEXER_ATTN_Q_B)
# tensors llama.cpp's converter keeps in F32 whatever the chosen type (beside 1-D tensors and norms)
FORCE_F32 = (T.FFN_GATE_INP, T.INDEXER_PROJ)
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+_proj)$")


@dataclass(frozen=True)
class GGUFArch:
    """A GGUF architecture of the family: its ``general.architecture`` name, the gguf table its tensor names
    come from plus the tensors that table lacks, whether llama.cpp's converter keeps the MTP layers by
    default, its extra uint32 metadata keys as (gguf key template, ModelConfig attribute), and whether its
    converter requires ``add_bos_token`` true (it then names the pre-tokenizer from ids that start with
    BOS, whatever tokenizer_config.json says: llama.cpp's fix for V3.2's release, which says false)."""

    name: str
    table: gguf.MODEL_ARCH
    extra: tuple[gguf.MODEL_TENSOR, ...]
    keeps_mtp: bool
    kv: tuple[tuple[str, str], ...] = ()
    bos_required: bool = False


_IDX = gguf.Keys.Attention.Indexer
DEEPSEEK2 = GGUFArch("deepseek2", gguf.MODEL_ARCH.DEEPSEEK2, NEXTN, keeps_mtp=False)
DEEPSEEK32 = GGUFArch(
    "deepseek32",  # llama.cpp's LLM_ARCH_DEEPSEEK32 (gguf-py's MODEL_ARCH.DEEPSEEK32, newer than PyPI's gguf)
    gguf.MODEL_ARCH.DEEPSEEK2,
    NEXTN + INDEXER,
    keeps_mtp=True,
    kv=((_IDX.HEAD_COUNT, "index_n_heads"), (_IDX.KEY_LENGTH, "index_head_dim"), (_IDX.TOP_K, "index_topk")),
    bos_required=True,
)


def gguf_arch(cfg: ModelConfig) -> GGUFArch:
    """``deepseek32`` for a checkpoint with the DSA indexer (V3.2), else ``deepseek2``."""
    return DEEPSEEK32 if cfg.has_indexer else DEEPSEEK2


def name_map(arch: GGUFArch, blocks: int) -> gguf.TensorNameMap:
    """gguf's ``TensorNameMap`` for the architecture over ``blocks`` blocks, with its extra tensors mapped
    through gguf's own HF name patterns."""
    names = gguf.get_tensor_name_map(arch.table, blocks)
    known = set(gguf.MODEL_TENSORS[arch.table])
    for tensor in arch.extra:
        if tensor in known:
            continue
        for bid in range(blocks):
            gname = gguf.TENSOR_NAMES[tensor].format(bid=bid)
            names.mapping[gname] = (tensor, gname)
            for key in gguf.TensorNameMap.block_mappings_cfg[tensor]:
                names.mapping[key.format(bid=bid)] = (tensor, gname)
    return names


@dataclass(frozen=True)
class GGUFTensor:
    """One output tensor. ``sources`` are HF logical weight names (linears by prefix): one, or a layer's
    routed experts in order (stacked along dim 0); ``part`` is ``k_b`` / ``v_b`` for the two halves of
    ``kv_b_proj``. ``shape`` is the numpy shape (GGUF writes it reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    sources: tuple[str, ...]
    part: str | None = None
    fallback: str | None = None  # "q4_0 -> f16" when the chosen type did not fit the rows
    quantizable: bool = True  # False: F32 by rule, never overridden


@dataclass(frozen=True)
class GGUFOptions:
    """``gguf_type`` for every quantizable tensor, ``overrides`` (regex, type) pairs (first match wins),
    ``mtp`` None for the architecture's default, ``split_max_size`` bytes per gguf-split file (0: one file),
    encoder ``workers`` and the model ``name`` (default: the checkpoint folder's)."""

    gguf_type: str = "bf16"
    overrides: tuple[tuple[str, str], ...] = ()
    mtp: bool | None = None
    split_max_size: int = 0
    workers: int = 1
    name: str | None = None

    @classmethod
    def parse(cls, gguf_type: str, overrides: list[str] | None = None, **kw) -> GGUFOptions:
        """Check the type names and ``REGEX=TYPE`` overrides (errors name the bad one)."""
        if gguf_type not in FILE_TYPES:
            raise DSV3Error(f"--gguf-type {gguf_type!r}: use one of {', '.join(FILE_TYPES)}")
        pairs = []
        for spec in overrides or ():
            regex, sep, typ = spec.rpartition("=")
            if not sep or not regex or typ not in QTYPES:
                raise DSV3Error(
                    f"--gguf-tensor-type {spec!r}: expected REGEX=TYPE with TYPE one of {', '.join(QTYPES)}"
                )
            try:
                re.compile(regex)
            except re.error as e:
                raise DSV3Error(f"--gguf-tensor-type {spec!r}: bad regex ({e})") from None
            pairs.append((regex, typ))
        if kw.get("split_max_size", 0) < 0:
            raise DSV3Error(f"--gguf-split-max-size {kw['split_max_size']}: must be positive")
        return cls(gguf_type, tuple(pairs), **kw)


def keeps_mtp(cfg: ModelConfig, opts: GGUFOptions) -> bool:
    """Whether the MTP layers are written: ``opts.mtp``, else the architecture's converter default."""
    return gguf_arch(cfg).keeps_mtp if opts.mtp is None else opts.mtp


def block_count(cfg: ModelConfig, opts: GGUFOptions) -> int:
    """``<arch>.block_count``: the main layers, plus the MTP layers when kept."""
    return cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if keeps_mtp(cfg, opts) else 0)


def _fits(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> bool:
    return shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def choose_type(
    name: str, shape: tuple[int, ...], opts: GGUFOptions
) -> tuple[gguf.GGMLQuantizationType, str | None]:
    """The GGML type of a quantizable tensor: the first matching override, else the chosen type; F16 (and a
    note saying so) when its row length is not a multiple of the type's block."""
    want = next((t for rx, t in opts.overrides if re.search(rx, name)), opts.gguf_type)
    if _fits(shape, QTYPES[want]):
        return QTYPES[want], None
    block = gguf.GGML_QUANT_SIZES[QTYPES[want]][0]
    return QTYPES[FALLBACK], f"{want} -> {FALLBACK} (row length {shape[-1]} is not a multiple of {block})"


def _is_f32(name: str, kind: gguf.MODEL_TENSOR, shape: tuple[int, ...]) -> bool:
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return True
    return kind in FORCE_F32


def _gguf_name(hf: str, names: gguf.TensorNameMap) -> tuple[gguf.MODEL_TENSOR, str]:
    mapped = names.get_type_and_name(
        hf.replace("e_score_correction_bias", "e_score_correction.bias"), (".weight", ".bias")
    )
    if mapped is None:
        raise DSV3Error(f"{hf}: no GGUF name in gguf's tensor map for this architecture")
    return mapped


def _entries(cfg: ModelConfig, w: Weight) -> list[tuple[str, tuple[int, ...], tuple[str, ...], str | None]]:
    """(HF name of the output, numpy shape, sources, part) for one logical weight; routed experts give their
    stacked tensor at expert 0 and nothing for the others."""
    hf = f"{w.name}.weight" if w.linear else w.name
    m = _EXPERT_RE.match(w.name)
    if m:
        if m.group(2) != "0":
            return []
        srcs = tuple(f"{m.group(1)}.{j}.{m.group(3)}" for j in range(cfg.n_routed_experts))
        return [(f"{m.group(1)}.{m.group(3)}.weight", (cfg.n_routed_experts, *w.shape), srcs, None)]
    if w.name.endswith("self_attn.kv_b_proj"):
        nh, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        base = w.name.removesuffix("kv_b_proj")
        return [
            (f"{base}k_b_proj.weight", (nh, r, nope), (w.name,), "k_b"),
            (f"{base}v_b_proj.weight", (nh, v, r), (w.name,), "v_b"),
        ]
    return [(hf, w.shape, (w.name,), None)]


def plan_tensors(cfg: ModelConfig, opts: GGUFOptions) -> list[GGUFTensor]:
    """Every output tensor in checkpoint order (the MTP layers when :func:`keeps_mtp`)."""
    blocks = block_count(cfg, opts)
    names = name_map(gguf_arch(cfg), blocks)
    out = []
    for w in model_weights(cfg):
        if w.layer is not None and w.layer >= blocks:
            continue
        if cfg.tie_word_embeddings and w.name == "lm_head.weight":
            continue
        for hf, shape, srcs, part in _entries(cfg, w):
            kind, name = _gguf_name(hf, names)
            if _is_f32(name, kind, shape):
                out.append(GGUFTensor(name, shape, QTYPES["f32"], srcs, part, quantizable=False))
            else:
                qtype, fb = choose_type(name, shape, opts)
                out.append(GGUFTensor(name, shape, qtype, srcs, part, fb))
    _check_overrides(out, opts)
    return out


def _check_overrides(tensors: list[GGUFTensor], opts: GGUFOptions) -> None:
    """Every override must match a tensor it can set: a quantizable one, or (for ``f32``) any tensor."""
    for rx, typ in opts.overrides:
        hits = [t for t in tensors if re.search(rx, t.name)]
        if not hits:
            raise DSV3Error(
                f"--gguf-tensor-type {rx}={typ}: the regex matches no GGUF tensor of this model "
                f"(names look like {tensors[-1].name}); fix the regex"
            )
        if typ != "f32" and not any(t.quantizable for t in hits):
            raise DSV3Error(
                f"--gguf-tensor-type {rx}={typ}: matches only tensors llama.cpp keeps in F32 (e.g. "
                f"{hits[0].name}); use f32 or a regex for weight matrices"
            )


def byte_shape(t: GGUFTensor) -> tuple[tuple[int, ...], object, int]:
    """(shape given to GGUFWriter.add_tensor_info, its numpy dtype, bytes) of a planned tensor."""
    import numpy as np

    if t.qtype == QTYPES["f32"]:
        dtype, shape = np.float32, t.shape
    elif t.qtype == QTYPES["f16"]:
        dtype, shape = np.float16, t.shape
    elif t.qtype == QTYPES["bf16"]:
        dtype, shape = np.uint16, t.shape
    else:
        dtype, shape = np.uint8, tuple(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))
    n = np.dtype(dtype).itemsize
    for d in shape:
        n *= d
    return shape, dtype, n
