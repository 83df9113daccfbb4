"""Random initialisation and saving of :class:`dsv3tools.model.transformer.Transformer` weights.

- :func:`random_model` / :func:`init_random`: trainable float Parameters drawn like the synthetic
  checkpoints' (``synth.random_weight``), for training the tiny model and for tests;
- :func:`save_checkpoint`: the model as an HF-format checkpoint (fp8 blocks or bf16) written through
  :mod:`dsv3tools.checkpoint.writer`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from dsv3tools.checkpoint.layout import Weight, model_weights, storage
from dsv3tools.checkpoint.synth import random_weight
from dsv3tools.checkpoint.writer import TORCH_DTYPES, OutSpec, WriteJob, execute, plan_shards
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.model.linear import dequant_weight
from dsv3tools.model.loading import attach
from dsv3tools.model.transformer import Transformer
from dsv3tools.quant.reference import fp8_block_quant

FP8_QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def random_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> Transformer:
    """A trainable model: ``Transformer(cfg, dtype=dtype, **kw)`` with float Parameters drawn like
    ``synth.random_weight`` (:func:`init_random`)."""
    return init_random(Transformer(cfg, dtype=dtype, **kw), seed)


def init_random(model: Transformer, seed: int = 0) -> Transformer:
    """Float trainable Parameters (``model.dtype``) drawn like ``synth.random_weight``; the router bias is
    a float32 buffer (updated in place by bias balancing)."""
    for w in model_weights(model.config):
        t = random_weight(w, seed)
        if w.name.endswith("e_score_correction_bias"):
            attach(model, w.name, t.to(model.device))
        else:
            name = f"{w.name}.weight" if w.linear else w.name
            attach(model, name, nn.Parameter(t.to(device=model.device, dtype=model.dtype)))
    return model


def logical_tensor(model: Transformer, w: Weight) -> torch.Tensor:
    """The float32 value of a logical weight of the model (linears dequantized)."""
    if w.linear:
        return dequant_weight(model.get_submodule(w.name), torch.float32).detach().cpu()
    prefix, _, suffix = w.name.rpartition(".")
    return getattr(model.get_submodule(prefix), suffix).detach().float().cpu()


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    fmt: str = "fp8",
    tokenizer_files: dict | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> dict:
    """Write the model as an HF-format checkpoint (fp8 block-quantized or bf16) through the writer."""
    if fmt not in ("fp8", "bf16"):
        raise DSV3Error(f"save_checkpoint: fmt {fmt!r}; use fp8 or bf16")
    cfg = model.config
    weights = {w.name: w for w in model_weights(cfg)}
    specs = [
        OutSpec(n, dt, shape, key=w.name)
        for w in weights.values()
        for n, (dt, shape) in storage(w, fmt).items()
    ]
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def produce(spec: OutSpec) -> torch.Tensor:
        w = weights[spec.key]
        if spec.dtype == "F8_E4M3" or spec.name.endswith("_scale_inv"):
            if w.name not in cache:
                cache.clear()
                cache[w.name] = fp8_block_quant(logical_tensor(model, w), (128, 128))
            return cache[w.name][0 if spec.dtype == "F8_E4M3" else 1]
        return logical_tensor(model, w).to(TORCH_DTYPES[spec.dtype])

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(repr(float(p.detach().double().sum())).encode())
    config = cfg.to_dict(
        quantization_config=FP8_QUANT_CONFIG if fmt == "fp8" else None, torch_dtype="bfloat16"
    )
    job = WriteJob(
        Path(out_dir),
        plan_shards(specs, max_shard_bytes),
        produce,
        config,
        "save_checkpoint",
        {"fmt": fmt, "digest": digest.hexdigest()},
        extra_data=dict(tokenizer_files or {}),
    )
    return execute(job)
