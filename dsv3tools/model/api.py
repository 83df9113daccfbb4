"""``load_model``, the public entry point: one call for every kind of path, dispatched to the loader that
owns it. A folder written by ``reshard --format dsv3tools`` runs across ranks
(:func:`dsv3tools.model.distributed.load_resharded`); a ``.gguf`` (or a folder holding one GGUF model) loads
through :func:`dsv3tools.converters.gguf.load.load_gguf`; any other checkpoint folder loads in this process
(:func:`dsv3tools.model.loading.load_checkpoint`). The loaders know nothing of each other or of this table. :func:`compute_dtype` is the one table of
compute-dtype names the commands' ``--dtype`` options accept; :func:`model_config` is the validated config of
any model path, before its weights are touched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from typing_extensions import TypedDict, Unpack

from dsv3tools.checkpoint.validate import validate_checkpoint
from dsv3tools.config import ModelConfig
from dsv3tools.converters.gguf.files import is_gguf
from dsv3tools.errors import DSV3Error
from dsv3tools.model.distributed import is_resharded, load_resharded
from dsv3tools.model.loading import load_checkpoint
from dsv3tools.model.transformer import Transformer


def _load_gguf(path: Path, **options) -> Transformer:
    from dsv3tools.converters.gguf.load import load_gguf  # imports gguf; only GGUF paths pay for it

    return load_gguf(path, **options)


# (does this loader own the path, the loader) in order; the last entry takes everything else
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., Transformer]]] = [
    (is_resharded, load_resharded),
    (is_gguf, _load_gguf),
    (lambda path: True, load_checkpoint),
]


def model_config(path: str | Path) -> ModelConfig:
    """The config of the model at ``path`` after its validation gate (SPEC sec. 14, headers only): a GGUF's
    from its metadata, a checkpoint's or resharded folder's from config.json."""
    if is_gguf(path):
        from dsv3tools.converters.gguf.read import open_gguf

        return open_gguf(path).config
    return validate_checkpoint(path).config


# the names ``--dtype`` accepts (SPEC sec. 2, 13): float16 keeps the residual stream rescaled (model.transformer)
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``--dtype`` name (bfloat16, float16, float32 or their short forms)."""
    if name not in COMPUTE_DTYPES:
        raise DSV3Error(f"--dtype {name!r}: use bfloat16, float16 or float32")
    return COMPUTE_DTYPES[name]


class LoadOptions(TypedDict, total=False):
    """What every loader takes besides the path (defaults are :func:`load_checkpoint`'s)."""

    device: str | torch.device
    dtype: torch.dtype | None
    backend: str
    offload: bool
    attn_impl: str
    materialize: bool
    indexer_precision: str  # V3.2's DSA indexer scoring: float32 (default) | fp8 (SPEC sec. 11)


def load_model(path: str | Path, **options: Unpack[LoadOptions]) -> Transformer:
    """A :class:`Transformer` over the checkpoint at ``path``, weights attached in place (SPEC sec. 2),
    from the first loader in :data:`LOADERS` that owns the path. ``device`` (default cpu), ``dtype`` (the
    compute dtype, default bf16), ``backend`` auto | dequant | torch | triton (auto: the exact dequantizing
    path on CPU, the Triton kernels on CUDA), ``offload`` (stream layers from disk), ``attn_impl`` and
    ``materialize`` (convert the weights once at load; faster, same logits, more memory) are
    :func:`~dsv3tools.model.loading.load_checkpoint`'s options."""
    path = Path(path)
    for owns, loader in LOADERS:
        if owns(path):
            precision = options.pop("indexer_precision", "float32")
            model = loader(path, **options)
            model.set_indexer_precision(precision)
            return model
    raise AssertionError("unreachable: the last loader owns every path")
