"""The FP4 (compressed-tensors NVFP4A16 / MXFP4A16) and FP16 targets of ``convert``: their config entries,
the per-linear encoders the streaming producer calls, and the FP16 range check that runs before anything
is written. The formulas are :mod:`dsv3tools.quant.fp4`'s; ``converters.convert`` plans and writes.

NVFP4 global scales are shared by the linears vLLM fuses into one layer (``q_a_proj`` with
``kv_a_proj_with_mqa`` as ``fused_qkv_a_proj``; ``gate_proj`` with ``up_proj`` as ``gate_up_proj`` in dense
MLPs, shared experts and routed experts): vLLM keeps one global scale per fused layer (the max over its
parts, and ``[:, 0]`` of an expert's w13), so parts with different global scales would be dequantized
with the wrong one. The partner's amax is read once, when the first part is encoded.

FP16: every BF16 tensor becomes F16 and float32 tensors stay float32; a value that would round to inf
in float16 (magnitude >= 65520) stops the conversion with the tensor's name and largest magnitude. The
check reads only the scales of FP8 and int4 weights unless a block could reach the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv3tools.checkpoint.layout import FP4_GROUPS, Weight, detect_format
from dsv3tools.checkpoint.reader import Checkpoint, TensorInfo
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.bands import SourceWeight, bands
from dsv3tools.quant.fp4 import mxfp4_quant, nvfp4_global_scale, nvfp4_quant
from dsv3tools.quant.fp8_lut import fp8_dequant_lut
from dsv3tools.quant.reference import FP8_MAX

FP4_TARGETS = ("nvfp4", "mxfp4")
TARGETS = (*FP4_TARGETS, "fp16")
FP16_INF = 65520.0  # the smallest magnitude that rounds to inf in float16 (max finite 65504)
PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
# (suffix, partner suffix) pairs that vLLM loads into one fused layer
FUSED = (
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("gate_proj", "up_proj"),
)
Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class CastF16:
    """Producer key of a non-quantized tensor written as float16."""

    name: str


def fp4_quantization_config(fmt: str, ignore: list[str]) -> dict:
    """``quantization_config`` exactly as llm-compressor's ``model_free_ptq`` writes it for the NVFP4A16 /
    MXFP4A16 presets (compressed-tensors' model dump), without its ``version`` key (the writer's
    compressed-tensors version, which this writer is not)."""
    nv = fmt == "nvfp4"
    ct_format = f"{fmt}-pack-quantized"
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": FP4_GROUPS[fmt],
        "num_bits": 4,
        "observer": None,
        "observer_kwargs": {},
        "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
        "strategy": "tensor_group" if nv else "group",
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }
    group = {
        "format": ct_format,
        "input_activations": None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    return {
        "config_groups": {PRESETS[fmt]: group},
        "format": ct_format,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
    }


def float_format(infos: dict[str, TensorInfo], prefix: str) -> str | None:
    """:func:`detect_format` with float weights told apart: ``fp16`` for an F16 ``weight``."""
    fmt = detect_format(infos, prefix)
    if fmt == "bf16" and infos[f"{prefix}.weight"].dtype == "F16":
        return "fp16"
    return fmt


def fused_partner(prefix: str) -> str | None:
    """The linear whose NVFP4 global scale ``prefix`` shares (vLLM's fused layers), or None."""
    for a, b in FUSED:
        for mine, other in ((a, b), (b, a)):
            if prefix.endswith(f".{mine}"):
                return prefix[: -len(mine)] + other
    return None


def check_fp4_shape(w: Weight, fmt: str) -> None:
    """compressed-tensors packs FP4 only in whole groups along the input dimension."""
    group = FP4_GROUPS[fmt]
    if w.shape[1] % group:
        raise DSV3Error(
            f"{w.name}: input dimension {w.shape[1]} is not a multiple of the {fmt} group size {group} "
            f"(compressed-tensors cannot store it); keep it unquantized with --int4-scope experts"
        )


def source_amax(src: SourceWeight) -> float:
    """Largest magnitude of the float32 source weight."""
    if src.fmt in ("bf16", "fp16"):
        return float(src.w.abs().amax()) if src.w.numel() else 0.0
    amax = 0.0
    for r0, r1 in bands(*src.shape, src.block[0]):
        amax = max(amax, float(src.band(r0, r1).abs().amax()))
    return amax


class TargetEncoder:
    """Encodes one linear into an FP4 or FP16 target; NVFP4 amax values of fused partners are cached."""

    def __init__(self, get: Getter, infos: dict[str, TensorInfo], block: tuple[int, int]):
        self.get, self.infos, self.block = get, infos, block
        self._amax: dict[str, float] = {}

    def source(self, prefix: str, fmt: str, shape: tuple[int, int]) -> SourceWeight:
        return SourceWeight(self.get, prefix, fmt, shape, self.block)

    def global_scale(self, src: SourceWeight) -> torch.Tensor:
        """NVFP4 global scale of ``src`` and its fused partner (the larger amax of the two)."""
        amax = self._amax.pop(src.prefix, None)
        amax = source_amax(src) if amax is None else amax
        partner = fused_partner(src.prefix)
        pfmt = float_format(self.infos, partner) if partner is not None else None
        if pfmt in ("fp8", "bf16", "fp16", "int4"):
            other = self._amax.pop(partner, None)
            if other is None:  # the first of the two: remember both for the partner's turn
                other = source_amax(self.source(partner, pfmt, self._shape_of(partner, pfmt)))
                self._amax[partner], self._amax[src.prefix] = other, amax
            amax = max(amax, other)
        return nvfp4_global_scale(amax)

    def _shape_of(self, prefix: str, fmt: str) -> tuple[int, int]:
        if fmt == "int4":
            rows, words = self.infos[f"{prefix}.weight_packed"].shape
            return rows, words * 8
        return tuple(self.infos[f"{prefix}.weight"].shape)

    def encode(
        self,
        prefix: str,
        src_fmt: str,
        dst_fmt: str,
        shape: tuple[int, int],
        out_buffer: Callable[[tuple[int, int]], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        src = self.source(prefix, src_fmt, shape)
        if dst_fmt == "fp16":
            return {f"{prefix}.weight": to_fp16(src)}
        rows, cols = shape
        packed = torch.empty((rows, cols // 2), dtype=torch.uint8)
        group = FP4_GROUPS[dst_fmt]
        scale_dtype = torch.float8_e4m3fn if dst_fmt == "nvfp4" else torch.uint8
        scale = torch.empty((rows, cols // group), dtype=scale_dtype)
        gs = self.global_scale(src) if dst_fmt == "nvfp4" else None
        for r0, r1 in bands(rows, cols, src.block[0]):
            w = src.band(r0, r1)
            p, s = nvfp4_quant(w, gs) if gs is not None else mxfp4_quant(w)
            packed[r0:r1], scale[r0:r1] = p, s
        out = {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scale}
        if gs is not None:
            out[f"{prefix}.weight_global_scale"] = gs
        return out


def to_fp16(src: SourceWeight) -> torch.Tensor:
    """The float16 weight: one float32 -> float16 rounding of the float32 source."""
    out = torch.empty(src.shape, dtype=torch.float16)
    if src.fmt == "fp8" and fp8_dequant_lut(src.q, src.s, out, src.block):
        return out
    for r0, r1 in bands(*src.shape, src.block[0]):
        out[r0:r1].copy_(src.band(r0, r1))
    return out


# ---- FP16 range check ------------------------------------------------------------------------------
def _fp16_overflow(src: SourceWeight) -> float | None:
    """The largest magnitude of ``src`` when it reaches float16's inf, else None; FP8 and int4 weights
    are read only where a block's scale allows such a value."""
    if src.fmt == "fp8" and float(src.s.float().max()) * FP8_MAX < FP16_INF:
        return None
    if src.fmt == "int4" and float(src.scale.float().abs().max()) * 8 < FP16_INF:
        return None
    amax = source_amax(src)
    return amax if amax >= FP16_INF or math.isnan(amax) else None


def check_fp16_range(ck: Checkpoint, block: tuple[int, int]) -> None:
    """Raise DSV3Error naming the first tensor with a value beyond float16's range (nothing is written)."""
    infos = ck.infos()
    for w in ck.expected():
        if w.linear and w.quantizable:
            fmt = float_format(infos, w.name)
            amax = _fp16_overflow(SourceWeight(ck.get, w.name, fmt, (w.shape[0], w.shape[1]), block))
            name = w.name if fmt in ("int4", "nvfp4", "mxfp4") else f"{w.name}.weight"
        else:
            name = f"{w.name}.weight" if w.linear else w.name
            t = ck.get(name)
            if t.dtype != torch.bfloat16:
                continue
            a = float(t.abs().amax()) if t.numel() else 0.0
            amax = a if a >= FP16_INF else None
        if amax is not None:
            raise DSV3Error(
                f"{name}: largest magnitude {amax:.6g} overflows float16 (max 65504); "
                "convert to bf16 instead, or rescale that weight in the source"
            )
