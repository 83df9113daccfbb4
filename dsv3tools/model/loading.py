"""Loading an HF-format checkpoint folder into :class:`dsv3tools.model.transformer.Transformer`, in one process.

:func:`load_checkpoint` builds the modules (they allocate nothing) and attaches the checkpoint's tensors by
their HF names, memory-mapped through ``Checkpoint.get`` (FP8 codes + scales, int4 packed + scales and
bf16 stay in their stored form), or, with ``offload=True``, streams each layer's tensors from disk when
the layer runs and drops them after (:class:`LayerStreamer`). :func:`attach` / :func:`missing_weights` are
shared with the resharded loader (:mod:`dsv3tools.model.distributed`), which depends on this module and
never the reverse; :func:`dsv3tools.model.api.load_model` picks between them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dsv3tools.checkpoint.layout import layer_of
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.tokenizer import tokenizer_dir
from dsv3tools.checkpoint.writer import TORCH_DTYPES
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.model.attention import RMSNorm
from dsv3tools.model.indexer import LayerNorm
from dsv3tools.model.linear import Linear
from dsv3tools.model.moe import Gate
from dsv3tools.model.transformer import Embedding, Transformer

HEAD_NAMES = ("model.norm.weight", "lm_head.weight")
EMBED_NAME = "model.embed_tokens.weight"
# Vocab-sized tables stay memory-mapped under offload (the MTP layers' copies of the embedding and head too):
# only the looked-up rows / the pages being multiplied are touched, and they are file-backed, not copied.
MAPPED_SUFFIXES = ("embed_tokens.weight", "shared_head.head.weight", "lm_head.weight")
# Under offload a linear larger than this many elements is dequantized in row blocks (64 MB in float32).
OFFLOAD_CHUNK_ELEMS = 1 << 24


def attach(model: nn.Module, name: str, tensor: torch.Tensor | None) -> bool:
    """Set the tensor ``name`` (HF name) on its module; False if the model has no such module."""
    prefix, _, suffix = name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        return False
    if suffix not in module._buffers and suffix not in module._parameters:
        return False
    if tensor is None and suffix in module._parameters:
        del module._parameters[suffix]
        module.register_buffer(suffix, None)
    else:
        setattr(module, suffix, tensor)
    return True


def missing_weights(model: Transformer) -> list[str]:
    """Module paths (HF prefixes) that have no weights attached."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, Linear) and m.fmt == "empty":
            out.append(path)
        elif isinstance(m, (RMSNorm, Embedding, Gate)) and m.weight is None:
            out.append(f"{path}.weight")
        elif isinstance(m, Gate) and m.e_score_correction_bias is None:
            out.append(f"{path}.e_score_correction_bias")
        elif isinstance(m, LayerNorm) and (m.weight is None or m.bias is None):
            out.append(f"{path}.{'weight' if m.weight is None else 'bias'}")
    return out


class LayerStreamer:
    """Reads one layer's tensors into fresh memory when the layer runs and drops them afterwards, so peak
    anonymous memory stays at about one layer plus activations, caches and bounded dequant temporaries.
    The vocab-sized tables and the final norm (``resident``) are attached memory-mapped once instead."""

    def __init__(self, ckpt: Checkpoint, device: torch.device):
        self.ckpt, self.device = ckpt, device
        self.units: dict[int | str, list[str]] = {}
        self.resident: list[str] = []
        for name in ckpt.weight_map:
            layer = layer_of(name)
            if layer is None or name.endswith(MAPPED_SUFFIXES):
                self.resident.append(name)
            else:
                self.units.setdefault(layer, []).append(name)
        self._data_start: dict[str, int] = {}

    def read(self, name: str) -> torch.Tensor:
        """One tensor read with ``pread`` into a new buffer (no mmap that would keep pages resident)."""
        info = self.ckpt.info(name)
        path = self.ckpt.path / info.shard
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            if info.shard not in self._data_start:
                self._data_start[info.shard] = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
            view, pos, off = memoryview(buf.numpy()), 0, self._data_start[info.shard] + info.offsets[0]
            while pos < info.nbytes:
                n = os.preadv(fd, [view[pos:]], off + pos)
                if n <= 0:
                    raise DSV3Error(f"{path}: truncated while reading {name}; re-download the shard")
                pos += n
        finally:
            os.close(fd)
        t = buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
        return t.to(self.device) if self.device.type != "cpu" else t

    @contextlib.contextmanager
    def use(self, model: nn.Module, unit: int | str) -> Iterator[None]:
        names = self.units.get(unit, [])
        try:
            for name in names:
                attach(model, name, self.read(name))
            yield
        finally:
            for name in names:
                attach(model, name, None)


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    offload: bool = False,
    attn_impl: str = "absorb",
    materialize: bool = False,
) -> Transformer:
    """A :class:`Transformer` over the checkpoint at ``path`` (fp8, bf16 or int4), weights attached in place.

    ``dtype`` is the compute dtype (default bf16); ``backend`` auto | dequant | torch | triton (auto: the
    exact dequantizing path on CPU, the Triton kernels on CUDA); ``offload`` streams layers from disk;
    ``materialize`` converts the weights once at load into the compute dtype (faster, same logits, but
    the memory of the compute dtype instead of the mapped file; dequant backend only).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DSV3Error("--device cuda: no CUDA device is available; use --device cpu")
    ckpt = Checkpoint(path)
    model = Transformer(
        ckpt.config, dtype=dtype or torch.bfloat16, attn_impl=attn_impl, backend=backend, device=device
    )
    if offload:
        if materialize:
            raise DSV3Error(
                "offload streams the stored weights; drop materialize (it needs them all resident)"
            )
        _setup_offload(model, ckpt, device)
    else:
        _attach_from(model, ckpt, list(ckpt.weight_map), device)
        missing = [m for m in missing_weights(model) if not _is_absent_mtp(m, ckpt.config)]
        if missing:
            raise DSV3Error(
                f"{ckpt.path}: no tensor for {missing[0]} (+{len(missing) - 1} more); the checkpoint is incomplete"
            )
        if materialize:
            model.materialize()
    model.tokenizer_path = tokenizer_dir(path)
    return model.eval()


def _setup_offload(model: Transformer, ckpt: Checkpoint, device: torch.device) -> None:
    """Layer streaming: map the resident tables, check every main layer has tensors, bound temporaries."""
    model.streamer = LayerStreamer(ckpt, device)
    _attach_from(model, ckpt, model.streamer.resident, device)
    cfg = ckpt.config
    absent = [
        f"layer {u}" for u in cfg.all_layers[: cfg.num_hidden_layers] if not model.streamer.units.get(u)
    ]
    absent += [n for n in HEAD_NAMES if n not in ckpt.weight_map]
    if absent:
        raise DSV3Error(f"{ckpt.path}: no tensors for {absent[0]}; the checkpoint is incomplete")
    for m in model.modules():
        if isinstance(m, Linear):
            m.chunk_elems = OFFLOAD_CHUNK_ELEMS


def _is_absent_mtp(path: str, cfg: ModelConfig) -> bool:
    return any(path.startswith(f"model.layers.{layer}.") for layer in cfg.mtp_layers)


def _attach_from(model: Transformer, ckpt: Checkpoint, names: list[str], device: torch.device) -> None:
    for name in names:
        t = ckpt.get(name)
        attach(model, name, t if device.type == "cpu" else t.to(device))
