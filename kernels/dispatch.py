"""Linear-layer entry points over quantized weights, and the choice between Triton and PyTorch.

- :func:`resolve_backend` turns ``"auto" | "torch" | "triton"`` into the backend that will run.
- :func:`fp8_linear`: DeepSeek-V3's FP8 scheme, ``act_quant(x)`` (1 x 128 e4m3 groups) then the
  block-scaled ``fp8_gemm``. Both backends compute this same math: ``triton`` with the kernels in
  :mod:`dsv3tools.kernels.fp8`, ``torch`` with the float32 twins in :mod:`dsv3tools.kernels.reference`.
- :func:`fp8_linear_dequant`: the exact-dequant path ``x @ weight_dequant(q, s, x.dtype).T`` (no
  activation quantization), for parity against bf16/fp32 references.
- :func:`int4_linear`: W4A16 over compressed-tensors pack-quantized weights.

Leading batch dimensions of ``x`` are flattened into M and restored on the output. The Triton modules
are imported only when the Triton backend is used, so the torch backend works without a GPU or Triton.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from dsv3tools.errors import DSV3Error
from dsv3tools.kernels import launch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True if ``import triton`` works."""
    try:
        importlib.import_module("triton")
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu", *, fp8: bool = False) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``auto``: Triton on CUDA when it imports (and, with ``fp8=True``, when the GPU has native e4m3,
    compute capability >= 8.9), PyTorch everywhere else. ``triton`` on CPU is allowed only under
    ``TRITON_INTERPRET=1`` (slow; for tests); otherwise it raises :class:`DSV3Error` saying why.
    """
    if backend not in BACKENDS:
        raise DSV3Error(f"unknown kernel backend {backend!r}; use one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    usable = triton_available() and (
        device.type == "cuda" or (device.type == "cpu" and launch.interpret_env())
    )
    if backend == "auto":
        if device.type == "cuda" and usable and (not fp8 or launch.fp8_supported(device)):
            return "triton"
        return "torch"
    if not triton_available():
        raise DSV3Error(
            "backend 'triton' requested but triton does not import; pip install 'triton>=3.1,<3.10'"
        )
    if not usable:
        raise DSV3Error(
            f"backend 'triton' cannot run on {device.type} tensors; use a CUDA device, backend 'torch', "
            "or set TRITON_INTERPRET=1 (CPU interpreter, slow) before dsv3tools.kernels is imported"
        )
    if fp8 and not launch.fp8_supported(device):
        raise DSV3Error(
            "backend 'triton' for FP8 needs a GPU with compute capability >= 8.9; use backend 'auto' or 'torch'"
        )
    return "triton"


def _impl(backend: str, fmt: str) -> ModuleType:
    """The module that implements ``fmt`` ("fp8" or "int4") for a resolved backend."""
    if backend == "torch":
        return importlib.import_module("dsv3tools.kernels.reference")
    return importlib.import_module(f"dsv3tools.kernels.{fmt}")


def _flatten(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """``x [..., K]`` as a contiguous ``[M, K]`` matrix, after checking dtype and K."""
    launch.check_tensor("x", x, launch.FLOAT_DTYPES, contiguous=False)
    if x.dim() == 0 or x.shape[-1] != k:
        raise DSV3Error(
            f"x has shape {tuple(x.shape)} but the {what} weight expects in_features={k} in the last dimension"
        )
    return x.reshape(-1, k).contiguous()


def fp8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    backend: str = "auto",
    scale_fmt: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y [..., N] = fp8_gemm(act_quant(x), q, s)``: DeepSeek's FP8 linear (no bias).

    ``x`` bf16/fp16/fp32 ``[..., K]``; ``q`` e4m3 ``[N, K]``; ``s`` float32 ``[ceil(N/128), ceil(K/128)]``
    (the checkpoint's ``weight_scale_inv``). ``scale_fmt="ue8m0"`` rounds the activation scales up to
    powers of two (DeepSeek-V3.1). Output dtype defaults to ``x.dtype``.
    """
    launch.check_tensor("q", q, (launch.FP8_DTYPE,), ndim=2)
    x2 = _flatten(x, q.shape[1], "fp8")
    impl = _impl(resolve_backend(backend, x.device, fp8=True), "fp8")
    xq, xs = impl.act_quant(x2, 128, scale_fmt)
    y = impl.fp8_gemm(xq, xs, q, s, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


def fp8_linear_dequant(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """``x @ weight_dequant(q, s, dtype=x.dtype).T``: the exact-dequant FP8 path (activations unquantized).

    The weight is materialized in ``x.dtype``; ``backend`` picks who dequantizes it (default the twin).
    """
    launch.check_tensor("q", q, (launch.FP8_DTYPE,), ndim=2)
    _flatten(x, q.shape[1], "fp8")
    impl = _impl(resolve_backend(backend, x.device, fp8=True), "fp8")
    w = impl.weight_dequant(q, s, dtype=x.dtype)
    return torch.nn.functional.linear(x, w)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int] | torch.Tensor,
    group_size: int = 128,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A16 ``y [..., N] = x @ (q * scale).T`` for a compressed-tensors pack-quantized Linear (no bias).

    ``packed`` int32 ``[N, K/8]``, ``scale`` bf16 ``[N, K/group_size]``, ``shape`` the stored
    ``weight_shape`` (``[N, K]``, a tuple or the int64 tensor). fp32 accumulation; output dtype
    defaults to ``x.dtype``.
    """
    if isinstance(shape, torch.Tensor):
        shape = tuple(int(v) for v in shape.tolist())
    n, k, _ = launch.check_int4(packed, scale, shape, group_size)
    x2 = _flatten(x, k, "int4")
    impl = _impl(resolve_backend(backend, x.device), "int4")
    y = impl.int4_gemm(x2, packed, scale, group_size, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], n)
