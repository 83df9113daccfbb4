"""Launcher checks shared by the Triton kernels and their twins.

Every public kernel entry point validates its arguments here *before* anything is launched, so a bad
call fails with one line that says what is wrong and how to fix it, instead of a Triton compile error,
an illegal memory access or silently wrong numbers. Also owns the tile heuristics and the question
"is Triton running under the CPU interpreter".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

from dsv3tools.errors import DSV3Error
from dsv3tools.quant.reference import cdiv

BLOCK = 128
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn


class KernelLaunchError(DSV3Error, ValueError):
    """A kernel was called with arguments it cannot handle (caught as DSV3Error or ValueError)."""


def interpret_env() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str, t: object, dtypes: Iterable[torch.dtype], ndim: int | None = None, contiguous: bool = True
) -> torch.Tensor:
    """Check type, dtype, rank and contiguity of one kernel argument; return it."""
    dtypes = tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise KernelLaunchError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise KernelLaunchError(
            f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {_names(dtypes)} "
            f"(convert it with .to(...) before the call)"
        )
    if ndim is not None and t.dim() != ndim:
        raise KernelLaunchError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise KernelLaunchError(
            f"{name} with shape {tuple(t.shape)} is not contiguous; pass {name}.contiguous()"
        )
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelLaunchError(
            f"kernel arguments are on different devices ({listing}); move them to one device"
        )
    return first


def check_triton_device(device: torch.device, interpreted: bool) -> None:
    """Triton needs CUDA tensors, or CPU tensors when its interpreter is active."""
    if device.type == "cuda":
        if interpreted:
            raise KernelLaunchError(
                "the Triton kernels were loaded under TRITON_INTERPRET=1 and cannot take CUDA tensors; "
                "unset TRITON_INTERPRET or pass CPU tensors"
            )
        return
    if device.type == "cpu" and interpreted:
        return
    hint = (
        "TRITON_INTERPRET=1 is set but dsv3tools.kernels was imported before it was; set it before the first import"
        if interpret_env()
        else "use backend='torch', move the tensors to CUDA, or set TRITON_INTERPRET=1 to run Triton on CPU"
    )
    raise KernelLaunchError(f"Triton kernels cannot run on {device.type} tensors: {hint}")


@functools.cache
def fp8_supported(device: torch.device) -> bool:
    """Triton's e4m3 type needs compute capability >= 8.9 (Ada, Hopper, Blackwell); CPU = interpreter.
    Cached per device: it is asked on every launch."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (what a grid must fill); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_fp8_device(device: torch.device, interpreted: bool) -> None:
    """:func:`check_triton_device` plus the e4m3 capability check."""
    check_triton_device(device, interpreted)
    if not fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise KernelLaunchError(
            f"the FP8 Triton kernels need a GPU with compute capability >= 8.9, this one is {major}.{minor}; "
            "use backend='torch' (or 'auto', which picks it there)"
        )


def check_scale_grid(
    s_name: str, s: torch.Tensor, w_name: str, w_shape: tuple[int, ...], block: int = BLOCK
) -> None:
    """A 2-D block-scale grid must be ``[ceil(rows / block), ceil(cols / block)]`` of the weight."""
    expected = (cdiv(w_shape[0], block), cdiv(w_shape[1], block))
    if tuple(s.shape) != expected:
        raise KernelLaunchError(
            f"{s_name} has shape {tuple(s.shape)} but {w_name} {tuple(w_shape)} with {block}x{block} blocks "
            f"needs {expected}; pass the weight's own *_scale_inv tensor"
        )


def check_act_quant(x: torch.Tensor, block_size: int, scale_fmt: str | None) -> None:
    """Arguments of ``act_quant``."""
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise KernelLaunchError(
            f"act_quant needs x with a non-empty last dimension, got shape {tuple(x.shape)}"
        )
    if block_size <= 0 or block_size & (block_size - 1):
        raise KernelLaunchError(f"block_size must be a positive power of two, got {block_size}")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise KernelLaunchError(f"unknown scale_fmt {scale_fmt!r}; use None, 'float' or 'ue8m0'")


def check_weight_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.device:
    """Arguments of ``weight_dequant``."""
    check_tensor("q", q, (FP8_DTYPE,), ndim=2)
    check_tensor("s", s, (torch.float32,), ndim=2)
    check_scale_grid("s", s, "q", tuple(q.shape))
    if dtype not in FLOAT_DTYPES:
        raise KernelLaunchError(f"output dtype {dtype} not supported; use {_names(FLOAT_DTYPES)}")
    return check_same_device(q=q, s=s)


def check_fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype
) -> torch.device:
    """Arguments of ``fp8_gemm``: a [M, K] fp8 with a_s [M, ceil(K/128)], b [N, K] fp8 with its grid."""
    check_tensor("a", a, (FP8_DTYPE,), ndim=2)
    check_tensor("b", b, (FP8_DTYPE,), ndim=2)
    check_tensor("a_s", a_s, (torch.float32,), ndim=2)
    check_tensor("b_s", b_s, (torch.float32,), ndim=2)
    m, k = a.shape
    if b.shape[1] != k:
        raise KernelLaunchError(
            f"K mismatch: activation a has K={k} but weight b {tuple(b.shape)} has K={b.shape[1]}; "
            "the weight must be [out_features, in_features] with in_features == x.shape[-1]"
        )
    if tuple(a_s.shape) != (m, cdiv(k, BLOCK)):
        raise KernelLaunchError(
            f"a_s has shape {tuple(a_s.shape)} but a {tuple(a.shape)} needs ({m}, {cdiv(k, BLOCK)}): "
            "one float32 scale per row and 128 columns, as act_quant returns"
        )
    check_scale_grid("b_s", b_s, "b", tuple(b.shape))
    if out_dtype not in FLOAT_DTYPES:
        raise KernelLaunchError(f"out_dtype {out_dtype} not supported; use {_names(FLOAT_DTYPES)}")
    return check_same_device(a=a, a_s=a_s, b=b, b_s=b_s)


def check_int4(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int] | None, group_size: int | None
) -> tuple[int, int, int]:
    """Arguments of the int4 kernels; return (N, K, group_size)."""
    check_tensor("packed", packed, (torch.int32,), ndim=2)
    check_tensor("scale", scale, (torch.bfloat16, torch.float16, torch.float32), ndim=2)
    n, k = packed.shape[0], packed.shape[1] * 8
    if shape is not None and (len(shape) != 2 or (int(shape[0]), int(shape[1])) != (n, k)):
        raise KernelLaunchError(
            f"weight_shape {tuple(int(v) for v in shape)} does not match packed {tuple(packed.shape)} "
            f"(which holds [{n}, {k}]: 8 int4 values per int32 word along the input dimension)"
        )
    if scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
        raise KernelLaunchError(
            f"scale has shape {tuple(scale.shape)} but a [{n}, {k}] int4 weight needs [{n}, {k} / group_size]"
        )
    group = k // scale.shape[1]
    if group_size is not None and group_size != group:
        raise KernelLaunchError(
            f"group_size {group_size} does not match scale {tuple(scale.shape)} for K={k} "
            f"(implies group_size {group}); pass the group size the weight was quantized with"
        )
    if group % 8:
        raise KernelLaunchError(f"int4 group size must be a multiple of 8, got {group}")
    check_same_device(packed=packed, scale=scale)
    return n, k, group


def check_int4_x(x: torch.Tensor, k: int, packed: torch.Tensor) -> None:
    """Activation of the W4A16 GEMM: [M, K] float, same device as the weight."""
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != k:
        raise KernelLaunchError(
            f"K mismatch: x has K={x.shape[1]} but the int4 weight has K={k}; "
            "the weight must be [out_features, in_features] with in_features == x.shape[-1]"
        )
    check_same_device(x=x, packed=packed)


def gemm_tiles(
    m: int, n: int, interpreted: bool, fp32: bool = False, sms: int = 1, fp8: bool = False
) -> dict[str, int]:
    """Tile sizes for the FP8 / W4A16 GEMMs, by M (decode M=1..16, mid, prefill).

    ``fp32``: float32 operands (IEEE dots, parity runs) take 4x the shared memory of fp8; keep tiles small.
    ``sms``: the device's multiprocessor count; decode narrows BLOCK_N until the grid fills them, except
    the FP8 GEMM at M = 1, which ran faster with the wide tile on an H200 (benchmarks/RESULTS.md).
    """
    if fp8 and m == 1:
        sms = 1
    if interpreted:  # the interpreter is per-program Python: few, modest tiles
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if fp32:
        return {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if m <= 16:  # decode: weight-bandwidth bound; narrow N tiles so that every SM streams weights
        block_n = 64
        while block_n > 16 and cdiv(n, block_n) < sms:
            block_n //= 2
        return {"BLOCK_M": 16, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 256 or n <= 2048:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
