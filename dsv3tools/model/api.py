"""``load_model``, the public entry point: one call for every kind of path, dispatched to the loader that
owns it. A folder written by ``reshard --format dsv3tools`` runs across ranks
(:func:`dsv3tools.model.distributed.load_resharded`); any other checkpoint folder loads in this process
(:func:`dsv3tools.model.loading.load_checkpoint`). The loaders know nothing of each other or of this table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv3tools.model.distributed import is_resharded, load_resharded
from dsv3tools.model.loading import load_checkpoint
from dsv3tools.model.transformer import Transformer

# (does this loader own the path, the loader) in order; the last entry takes everything else
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., Transformer]]] = [
    (is_resharded, load_resharded),
    (lambda path: True, load_checkpoint),
]


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    offload: bool = False,
    attn_impl: str = "absorb",
    materialize: bool = False,
    indexer_precision: str = "float32",
) -> Transformer:
    """A :class:`Transformer` over the checkpoint at ``path``, weights attached in place (SPEC sec. 2).

    ``dtype`` is the compute dtype (default bf16); ``backend`` auto | dequant | torch | triton (auto: the
    exact dequantizing path on CPU, the Triton kernels on CUDA); ``offload`` streams layers from disk;
    ``materialize`` converts the weights once at load into the compute dtype (faster, same logits, more
    memory); ``indexer_precision`` float32 | fp8 scores V3.2's DSA indexer (SPEC sec. 11). A resharded
    folder takes ``device``, ``dtype``, ``backend`` and ``attn_impl`` (each rank maps
    its own files).
    """
    path = Path(path)
    for owns, loader in LOADERS:
        if owns(path):
            if loader is load_resharded:
                model = loader(path, device=device, dtype=dtype, backend=backend, attn_impl=attn_impl)
            else:
                model = loader(
                    path,
                    device=device,
                    dtype=dtype,
                    backend=backend,
                    offload=offload,
                    attn_impl=attn_impl,
                    materialize=materialize,
                )
            model.set_indexer_precision(indexer_precision)
            return model
    raise AssertionError("unreachable: the last loader owns every path")
