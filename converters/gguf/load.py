"""``load_model(x.gguf)``: a :class:`~dsv3tools.model.transformer.Transformer` over a GGUF model (SPEC sec. 2,
12), so that ``compare``, ``eval`` and ``generate`` measure a GGUF against the checkpoint it came from.

The model is built from the config :mod:`.read` rebuilds from the metadata, and the weights attach in place
by their HF names one tensor (one expert) at a time: F32 / F16 / BF16 tensors as views on the file's private
map (file-backed, nothing copied, exactly the stored values), quantized tensors dequantized by
``gguf.quants`` once into the compute dtype (float32 for the router and norms), which is what the
dequantizing backend would compute per use from a float32 copy, without ever holding one. Peak memory is
the model in those dtypes plus one tensor's float32 temporary."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3tools.checkpoint.tokenizer import tokenizer_dir
from dsv3tools.errors import DSV3Error
from dsv3tools.model.loading import attach, missing_weights
from dsv3tools.model.transformer import Transformer

from .read import hf_tensors, open_gguf


def load_gguf(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    offload: bool = False,
    attn_impl: str = "absorb",
    materialize: bool = False,
) -> Transformer:
    """A :class:`Transformer` over the GGUF model at ``path`` (a ``.gguf``, the first of its gguf-split
    shards, or a folder holding one GGUF model). ``dtype`` is the compute dtype (default bf16) and the dtype
    quantized weights are dequantized into; ``materialize`` also converts the stored F32/F16/BF16 tensors
    into it (and stacks the experts). ``offload`` is refused: a GGUF's layers are not streamed."""
    if offload:
        raise DSV3Error(
            f"{path}: offload streams a safetensors checkpoint's layers; a GGUF loads whole (quantized "
            "tensors are dequantized once at load); drop --offload"
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DSV3Error("--device cuda: no CUDA device is available; use --device cpu")
    gm = open_gguf(path)  # the gate: files, splits, metadata and inventory, before any work
    dtype = dtype or torch.bfloat16
    model = Transformer(gm.config, dtype=dtype, attn_impl=attn_impl, backend=backend, device=device)
    for name, values in hf_tensors(gm, dtype):
        if not attach(model, name, values if device.type == "cpu" else values.to(device)):
            raise DSV3Error(
                f"{gm.path}: {name} has no place in the model built from its metadata; re-convert it"
            )
    missing = missing_weights(model)
    if missing:
        raise DSV3Error(f"{gm.path}: no tensor for {missing[0]} (+{len(missing) - 1} more); re-convert it")
    if materialize:
        model.materialize()
    model.tokenizer_path = tokenizer_dir(gm.path.parent)
    return model.eval()
