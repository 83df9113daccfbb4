"""``load_model``, the public entry point: one call for every kind of path, dispatched to the loader that
owns it. A folder written by ``reshard --format dsv3tools`` runs across ranks
(:func:`dsv3tools.model.distributed.load_resharded`); any other checkpoint folder loads in this process
(:func:`dsv3tools.model.loading.load_checkpoint`). The loaders know nothing of each other or of this table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from typing_extensions import TypedDict, Unpack

from dsv3tools.model.distributed import is_resharded, load_resharded
from dsv3tools.model.loading import load_checkpoint
from dsv3tools.model.transformer import Transformer

# (does this loader own the path, the loader) in order; the last entry takes everything else
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., Transformer]]] = [
    (is_resharded, load_resharded),
    (lambda path: True, load_checkpoint),
]


class LoadOptions(TypedDict, total=False):
    """What every loader takes besides the path (defaults are :func:`load_checkpoint`'s)."""

    device: str | torch.device
    dtype: torch.dtype | None
    backend: str
    offload: bool
    attn_impl: str
    materialize: bool


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
            return loader(path, **options)
    raise AssertionError("unreachable: the last loader owns every path")
