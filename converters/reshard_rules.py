"""How each checkpoint tensor is laid out over N ranks (SPEC sec. 6): the tensor-parallel split rules,
their divisibility checks (FP8 scales split with their weights, so splits must fall on 128-blocks), the
physical-slot names of routed experts, and the pieces (source tensor, dim, part) a rank file holds.

Split rules (HF names; the same for every decoder layer, the MTP layer included):

* ``self_attn.q_b_proj`` (Moonlight: ``q_proj``), ``self_attn.kv_b_proj``: dim 0, by heads;  ``self_attn.o_proj``: dim 1, by heads;
* dense ``mlp.{gate,up}_proj`` and ``mlp.shared_experts.{gate,up}_proj``: dim 0; their ``down_proj``: dim 1;
* ``embed_tokens`` / ``lm_head`` (and the MTP copies ``embed_tokens``, ``shared_head.head``): dim 0, by vocab;
* everything else (q_a_proj, kv_a_proj_with_mqa, norms, router weight and bias, eh_proj) whole on every rank;
* routed experts: whole, on the ranks whose physical slots hold them.

An FP8 weight's ``weight_scale_inv`` is split along the same dim into the same number of parts, which
needs every slice to be whole 128-blocks. Where it is not (``cuts_fp8_block``: the tiny preset's
q_b_proj at N=2, DeepSeek-V3's dense MLP at N=32), the dsv3tools format keeps that weight and its scale
whole on every rank (listed under ``unsplit`` in reshard.json) and the distributed loader dequantizes it
to bf16 and takes its slice at load time; the deepseek format refuses (the demo asserts even splits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_SLOT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.slots\.(\d+)\.(.+)$")
_SUFFIXES = (".weight_scale_inv", ".weight")

# module-name suffix -> (split dim, what the parts count: heads | rows | vocab)
_MODULE_RULES: tuple[tuple[str, int, str], ...] = (
    ("self_attn.q_b_proj", 0, "heads"),
    ("self_attn.q_proj", 0, "heads"),  # Moonlight (q_lora_rank null)
    ("self_attn.kv_b_proj", 0, "heads"),
    ("self_attn.o_proj", 1, "heads"),
    ("mlp.shared_experts.gate_proj", 0, "rows"),
    ("mlp.shared_experts.up_proj", 0, "rows"),
    ("mlp.shared_experts.down_proj", 1, "rows"),
    ("mlp.gate_proj", 0, "rows"),
    ("mlp.up_proj", 0, "rows"),
    ("mlp.down_proj", 1, "rows"),
)
_VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Piece:
    """What one output tensor is: part ``index`` of ``parts`` of source tensor ``src`` along ``dim``
    (``dim`` None: the whole tensor)."""

    src: str
    dim: int | None = None
    index: int = 0
    parts: int = 1


def module_of(name: str) -> str:
    """``...q_b_proj.weight_scale_inv`` -> ``...q_b_proj``; other names unchanged."""
    for suf in _SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def split_rule(name: str) -> tuple[int, str] | None:
    """(dim, unit) for a tensor-parallel tensor, None for tensors kept whole (and routed experts)."""
    if _EXPERT_RE.match(name):
        return None
    if name.endswith(_VOCAB_TENSORS):
        return 0, "vocab"
    mod = module_of(name)
    if mod == name:  # not a linear weight or scale
        return None
    for suffix, dim, unit in _MODULE_RULES:
        if mod.endswith("." + suffix):
            return dim, unit
    return None


def expert_tensor(name: str) -> tuple[int, int, str] | None:
    """``model.layers.L.mlp.experts.E.rest`` -> (L, E, rest), else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def slot_name(layer: int, slot: int, rest: str) -> str:
    """Name of a routed expert stored in physical slot ``slot`` (global index; phy2log maps it)."""
    return f"model.layers.{layer}.mlp.slots.{slot}.{rest}"


def parse_slot_name(name: str) -> tuple[int, int, str] | None:
    """``model.layers.L.mlp.slots.P.rest`` -> (L, P, rest), else None."""
    m = _SLOT_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def check_split(name: str, shape: tuple[int, ...], dtype: str, cfg: ModelConfig, parts: int) -> None:
    """Raise DSV3Error if tensor ``name`` cannot be split into ``parts`` equal parts by its rule."""
    rule = split_rule(name)
    if rule is None or parts == 1:
        return
    dim, unit = rule
    if unit == "heads" and cfg.num_attention_heads % parts:
        raise DSV3Error(
            f"{name}: num_attention_heads {cfg.num_attention_heads} cannot be split over --gpus {parts} "
            "(attention is tensor-parallel by heads); use a --gpus that divides the head count"
        )
    size = shape[dim]
    if name.endswith(".weight_scale_inv"):
        block = cfg.quant.block[dim]
        if size % parts:
            raise DSV3Error(
                f"{name}: {size} scale blocks of {block} along dim {dim} cannot be split into {parts} parts; "
                f"FP8 block scales split with their weight, so each slice must be whole {block}-blocks: "
                "use fewer --gpus, or convert --to bf16 first"
            )
        return
    if size % parts:
        raise DSV3Error(
            f"{name}: dim {dim} of size {size} is not divisible by --gpus {parts}; use a --gpus that divides it"
        )
    if dtype == "F8_E4M3":
        block = cfg.quant.block[dim]
        if (size // parts) % block:
            raise DSV3Error(
                f"{name}: FP8 weight with {size} {'rows' if dim == 0 else 'columns'} = {size / block:g} blocks of "
                f"{block}; a slice of {size // parts} over --gpus {parts} would cut a block (its scale cannot be "
                "split with it): use fewer --gpus, or convert --to bf16 first"
            )


def cuts_fp8_block(name: str, shape: tuple[int, ...], dtype: str, cfg: ModelConfig, parts: int) -> bool:
    """True for an FP8 weight whose equal split into ``parts`` would cut a quantization block (its scale
    grid cannot be split with it); the size itself divides evenly."""
    rule = split_rule(name)
    if rule is None or parts == 1 or dtype != "F8_E4M3":
        return False
    dim = rule[0]
    size, block = shape[dim], cfg.quant.block[dim]
    return size % parts == 0 and (size // parts) % block != 0


def split_shape(shape: tuple[int, ...], dim: int, parts: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] //= parts
    return tuple(out)


def placement_slots(phy2log: list[int], num_ranks: int, rank: int) -> list[tuple[int, int]]:
    """(global slot, logical expert) of ``rank``'s physical slots (rank-major)."""
    per = len(phy2log) // num_ranks
    return [(p, int(phy2log[p])) for p in range(rank * per, (rank + 1) * per)]
