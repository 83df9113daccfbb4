"""Linear layers over any stored weight format, and the one ``linear(x, layer)`` that picks the computation.

A :class:`Linear` holds exactly the tensors the checkpoint stores under its module prefix (HF names):
``weight`` (bf16/float, or e4m3 codes) with ``weight_scale_inv`` (FP8 block grid), or compressed-tensors
int4 ``weight_packed`` / ``weight_scale`` / ``weight_shape``, NVFP4 ``weight_packed`` / ``weight_scale`` /
``weight_global_scale`` or MXFP4 ``weight_packed`` / ``weight_scale`` (uint8 codes and exponents). Nothing is allocated at construction; the
loader attaches (memory-mapped) tensors afterwards, so a model is never materialized twice.

Backends (model-wide): ``dequant`` dequantizes the weight to the compute dtype per use (for FP8 exactly the
converter's ``bf16(float32(q) * s)``, so an FP8 checkpoint and its bf16 conversion give identical logits);
``torch`` / ``triton`` run the kernels' schemes (FP8 activation quantization + block-scaled GEMM, int4
W4A16) through :mod:`dsv3tools.kernels.dispatch`; ``auto`` is ``triton`` on CUDA where the kernels run and
``dequant`` everywhere else.

On a CPU without half-precision matmul units (no AVX512-BF16/AMX), torch's bf16/fp16 GEMM runs row by row
(about 7x below its float32 GEMM at 128 rows); :func:`dense` then computes such products in float32 from 4
rows up and rounds once to the activation dtype. That is the arithmetic of torch's own half GEMM (exact
products, float32 accumulation, one rounding), so only the summation order differs.

Two opt-in modes: :meth:`Linear.materialize` converts the weight once into the compute dtype (the values
``dequant`` would produce per use, held resident); ``Linear.chunk_elems`` (set for layer streaming)
dequantizes a large weight in row blocks so the float temporaries stay bounded.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3tools.checkpoint.layout import TENSOR_SUFFIXES
from dsv3tools.errors import DSV3Error
from dsv3tools.quant.fp4 import mxfp4_dequant, nvfp4_dequant
from dsv3tools.quant.fp8_lut import fp8_dequant_into
from dsv3tools.quant.reference import fp8_block_dequant, int4_dequant

MODEL_BACKENDS = ("auto", "dequant", "torch", "triton")
UPCAST_MIN_ROWS = 4  # torch's CPU half GEMM costs one weight pass per row; float32 wins from 4 rows
UPCAST_CHUNK_ELEMS = 1 << 20  # weight elements upcast to float32 at a time (4 MiB)


@functools.cache
def cpu_half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """True when this CPU has no hardware path for ``dtype`` matmuls (bf16: AVX512-BF16 or AMX tiles; fp16:
    AMX-FP16), so torch falls back to its row-by-row half GEMM."""
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }
    if dtype not in probes:
        return False
    return not any(getattr(torch.cpu, name, lambda: False)() for name in probes[dtype])


def dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in ``x.dtype`` (``F.linear``); bf16/fp16 products of at least ``UPCAST_MIN_ROWS`` rows on a
    CPU without half-precision matmul units run in float32 and are rounded once to ``x.dtype``, upcasting
    ``w`` ``UPCAST_CHUNK_ELEMS`` at a time (bounded temporaries)."""
    if not (
        x.device.type == "cpu"
        and x.dtype == w.dtype
        and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]
        and cpu_half_matmul_is_slow(x.dtype)
    ):
        return F.linear(x, w)
    x32, n = x.float(), w.shape[0]
    rows = max(1, UPCAST_CHUNK_ELEMS // w.shape[1])
    if rows >= n:
        return F.linear(x32, w.float()).to(x.dtype)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    for start in range(0, n, rows):
        out[..., start : start + rows] = F.linear(x32, w[start : start + rows].float())
    return out


def resolve_model_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` -> ``triton`` on a CUDA device whose GPU runs the FP8 kernels, else ``dequant``."""
    if backend not in MODEL_BACKENDS:
        raise DSV3Error(f"unknown backend {backend!r}; use one of {', '.join(MODEL_BACKENDS)}")
    if backend == "dequant":
        return backend
    from dsv3tools.kernels.dispatch import resolve_backend

    if backend == "auto":
        return "triton" if resolve_backend("auto", device, fp8=True) == "triton" else "dequant"
    return resolve_backend(backend, device)


class Linear(nn.Module):
    """A bias-free linear whose stored tensors are attached after construction (HF tensor names)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.backend = "dequant"
        self.chunk_elems: int | None = None  # dequantize in row blocks of at most this many elements
        for name in TENSOR_SUFFIXES:
            self.register_buffer(name, None)

    @property
    def fmt(self) -> str:
        """``int4``, ``nvfp4``, ``mxfp4``, ``fp8``, ``float`` (bf16/f16/f32 weight) or ``empty``."""
        if self.weight_packed is not None:
            if self.weight_global_scale is not None:
                return "nvfp4"
            return "mxfp4" if self.weight_packed.dtype == torch.uint8 else "int4"
        if self.weight_scale_inv is not None:
            return "fp8"
        return "float" if self.weight is not None else "empty"

    def clear(self) -> None:
        """Drop the attached tensors (layer streaming)."""
        for name in TENSOR_SUFFIXES:
            if name in self._parameters:
                del self._parameters[name]
                self.register_buffer(name, None)
            else:
                setattr(self, name, None)

    def materialize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> None:
        """Hold the weight dequantized in ``dtype`` (the values the ``dequant`` backend computes per use),
        written into ``out`` (e.g. a slice of a stacked expert tensor) when given."""
        if out is None and self.fmt == "float" and self.weight.dtype == dtype:
            return  # already in the compute dtype: nothing to convert per use
        w = dequant_weight(self, dtype)
        if out is not None:
            w = out.copy_(w)
        self.clear()
        self.weight = w

    def weight_shape_2d(self) -> tuple[int, int]:
        """``(out, in)`` of the stored weight (a tensor-parallel slice may differ from the declared sizes)."""
        if self.weight_packed is not None:
            per_word = 8 if self.weight_packed.dtype == torch.int32 else 2
            return self.weight_packed.shape[0], self.weight_packed.shape[1] * per_word
        return tuple(self.weight.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


def fp8_dequant_bf16(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``bf16(float32(q) * s)``, bit-identical to ``quant.fp8_block_dequant``: on CPU through per-block
    tables (``fp8_lut``, 4-5x faster), elsewhere a broadcast instead of expanding the scale grid when the
    blocks tile the weight exactly."""
    (rows, cols), (b0, b1) = q.shape, block
    if q.device.type == "cpu":
        out = torch.empty((rows, cols), dtype=torch.bfloat16)
        fp8_dequant_into(q, s, out, block)
        return out
    if rows % b0 or cols % b1 or tuple(s.shape) != (rows // b0, cols // b1):
        return fp8_block_dequant(q, s, block, torch.bfloat16)
    w = q.to(torch.float32).view(rows // b0, b0, cols // b1, b1) * s.float()[:, None, :, None]
    return w.view(rows, cols).to(torch.bfloat16)


def dequant_weight(layer: Linear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight ``[out, in]`` in ``dtype`` (FP8 through bf16, as the converter writes it)."""
    return dequant_rows(layer, dtype, 0, None)


def dequant_rows(layer: Linear, dtype: torch.dtype, start: int, stop: int | None) -> torch.Tensor:
    """Rows ``start:stop`` of the layer's weight in ``dtype``; ``start`` must be a multiple of the FP8
    block height (the values are exactly those of :func:`dequant_weight`)."""
    fmt = layer.fmt
    if fmt == "float":
        w = layer.weight[start:stop] if start or stop is not None else layer.weight
        return w if w.dtype == dtype else w.to(dtype)
    if fmt == "fp8":
        q, s, b0 = layer.weight, layer.weight_scale_inv, layer.block[0]
        if start or stop is not None:
            stop = q.shape[0] if stop is None else stop
            q, s = q[start:stop], s[start // b0 : -(-stop // b0)]
        w = fp8_dequant_bf16(q, s, layer.block)
        return w if dtype == torch.bfloat16 else w.to(dtype)
    if fmt == "int4":
        packed, scale = layer.weight_packed[start:stop], layer.weight_scale[start:stop]
        shape = (packed.shape[0], packed.shape[1] * 8)
        if packed.device.type != "cpu":
            from dsv3tools.kernels.reference import int4_weight_dequant

            return int4_weight_dequant(packed, scale, shape, dtype)
        return int4_dequant(packed, scale, shape, dtype)
    if fmt == "nvfp4":
        gs = layer.weight_global_scale
        return nvfp4_dequant(layer.weight_packed[start:stop], layer.weight_scale[start:stop], gs, dtype)
    if fmt == "mxfp4":
        return mxfp4_dequant(layer.weight_packed[start:stop], layer.weight_scale[start:stop], dtype)
    raise DSV3Error("a linear layer has no weights attached; load the model with dsv3tools.load_model")


def _chunked_linear(x: torch.Tensor, layer: Linear, chunk_elems: int) -> torch.Tensor:
    """``x @ W.T`` dequantizing ``W`` in row blocks (bounded temporaries for large streamed weights)."""
    b0, (n_out, n_in) = layer.block[0], layer.weight_shape_2d()
    rows = max(b0, chunk_elems // n_in // b0 * b0)
    out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    for start in range(0, n_out, rows):
        stop = min(start + rows, n_out)
        out[..., start:stop] = dense(x, dequant_rows(layer, x.dtype, start, stop))
    return out


def linear(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """``x @ W.T`` for the layer's stored format on the layer's backend; output in ``x.dtype``."""
    fmt, backend = layer.fmt, layer.backend
    if fmt == "fp8" and backend in ("torch", "triton"):
        from dsv3tools.kernels.dispatch import fp8_linear

        return fp8_linear(x, layer.weight, layer.weight_scale_inv, backend)
    if fmt == "int4" and backend == "triton":
        from dsv3tools.kernels.dispatch import int4_linear

        packed, scale = layer.weight_packed, layer.weight_scale
        shape = (packed.shape[0], packed.shape[1] * 8)
        return int4_linear(x, packed, scale, shape, shape[1] // scale.shape[1], backend)
    if fmt == "float" and layer.weight.dtype == x.dtype:
        return dense(x, layer.weight)
    chunk = layer.chunk_elems
    if chunk is not None and fmt != "empty" and math.prod(layer.weight_shape_2d()) > chunk:
        return _chunked_linear(x, layer, chunk)
    return dense(x, dequant_weight(layer, x.dtype))
