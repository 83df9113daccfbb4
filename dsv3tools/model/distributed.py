"""Running a resharded checkpoint (``reshard --format dsv3tools``) across ranks with torch.distributed.

:func:`load_resharded` builds the ordinary :class:`~dsv3tools.model.transformer.Transformer`, swaps in the tensor- and
expert-parallel modules of :mod:`dsv3tools.model.parallel` (attention and dense MLPs split by heads /
rows, embedding and heads split by vocab, routed experts held per physical slot as ``placement.json``
says) and attaches only this rank's files (``rank{r}.safetensors.index.json``), memory-mapped. The result
is called like any model: ``model(input_ids)`` returns the full float32 logits on every rank. FP8
linears that reshard kept whole (``unsplit``: their split would cut a 128-block) are dequantized to bf16
(the dequant backend's exact values) and sliced here.

Under ``torchrun`` the process group is initialised here when needed (``WORLD_SIZE`` set): gloo on CPU,
nccl on CUDA (device ``cuda:LOCAL_RANK``). Only rank 0 keeps stdout (``quiet_other_ranks``), so a CLI
command that prints its result prints it once; errors on stderr still come from every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3tools.checkpoint.reader import map_shard, read_header, tensor_view
from dsv3tools.checkpoint.tokenizer import tokenizer_dir
from dsv3tools.checkpoint.validate import validate_checkpoint
from dsv3tools.config import ModelConfig
from dsv3tools.converters.reshard_rules import split_rule
from dsv3tools.errors import DSV3Error
from dsv3tools.model.linear import dequant_weight
from dsv3tools.model.loading import attach, missing_weights
from dsv3tools.model.moe import MoE
from dsv3tools.model.parallel import (
    ColumnParallelHead,
    ExpertParallelMoE,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from dsv3tools.model.transformer import Transformer

MANIFEST = "reshard.json"
PLACEMENT = "placement.json"


def is_resharded(path: str | Path) -> bool:
    """True for a folder written by ``reshard --format dsv3tools`` (it has reshard.json and placement.json)."""
    p = Path(path)
    if not (p / MANIFEST).is_file() or not (p / PLACEMENT).is_file():
        return False
    try:
        return json.loads((p / MANIFEST).read_text()).get("format") == "dsv3tools"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def is_main_process() -> bool:
    """Rank 0, or not distributed at all."""
    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); initialises the default group from torchrun's env if needed."""
    device = torch.device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise DSV3Error(
                "a resharded checkpoint runs one process per rank: start it with "
                "torchrun --nproc-per-node N (N = the --gpus it was resharded for)"
            )
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        )
        torch.cuda.set_device(device)
    return rank, world, device


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DSV3Error(f"{path}: missing; re-run dsv3tools reshard for this folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DSV3Error(f"{path}: not valid JSON; re-run dsv3tools reshard for this folder") from None


def _parallelize(model, cfg: ModelConfig, placement: dict, rank: int, world: int) -> None:
    """Swap the model's modules for their tensor/expert-parallel versions (no weights attached yet)."""

    h, v, blk = cfg.hidden_size, cfg.vocab_size, cfg.quant.block
    start = rank * (v // world)
    model.model.embed_tokens = VocabParallelEmbedding(v, h, start)
    model.lm_head = ColumnParallelHead(h, v, blk)
    nh = cfg.num_attention_heads
    for key, blkm in model.model.layers.items():
        blkm.self_attn.o_proj = RowParallelLinear(nh * cfg.v_head_dim, h, blk)
        if isinstance(blkm.mlp, MoE):
            lp = placement["layers"].get(key)
            if lp is None:
                raise DSV3Error(f"placement.json has no layer {key}; re-run dsv3tools reshard")
            blkm.mlp = ExpertParallelMoE(cfg, lp["phy2log"], rank, world)
        else:
            blkm.mlp.down_proj = RowParallelLinear(cfg.intermediate_size, h, blk)
        if hasattr(blkm, "shared_head"):
            blkm.embed_tokens = VocabParallelEmbedding(v, h, start)
            blkm.shared_head.head = ColumnParallelHead(h, v, blk)


def _attach_rank(model, folder: Path, index: dict, device: torch.device) -> None:
    by_file: dict[str, list[str]] = {}
    for name, fname in index["weight_map"].items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in sorted(by_file.items()):
        path = folder / fname
        if not path.is_file():
            raise DSV3Error(f"{path}: missing rank file; re-run dsv3tools reshard to finish the folder")
        infos, mapped = read_header(path), map_shard(path)
        for name in names:
            if name not in infos:
                raise DSV3Error(
                    f"{path}: tensor {name} is in the rank index but not in the file; re-run reshard"
                )
            t = tensor_view(mapped, infos[name])
            if not attach(model, name, t if device.type == "cpu" else t.to(device)):
                raise DSV3Error(f"{path}: tensor {name} has no place in the model; re-run dsv3tools reshard")
    missing = missing_weights(model)
    if missing:
        raise DSV3Error(f"{folder}: no tensor for {missing[0]} (+{len(missing) - 1} more) on this rank")


def _slice_unsplit(model, modules: list[str], rank: int, world: int) -> None:
    """FP8 linears stored whole (their split would cut a block): dequantize to bf16, keep this rank's slice."""
    for name in modules:
        layer = model.get_submodule(name)
        dim = split_rule(f"{name}.weight")[0]
        w = dequant_weight(layer, torch.bfloat16)
        size = w.shape[dim] // world
        w = w.narrow(dim, rank * size, size).contiguous()
        layer.clear()
        layer.weight = w


def load_resharded(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    attn_impl: str = "absorb",
    offload: bool = False,
    materialize: bool = False,
    quiet_other_ranks: bool = True,
):
    """This rank's part of a resharded checkpoint as a model with the same call signature as
    :func:`dsv3tools.load_model`'s (full float32 logits on every rank). Needs torch.distributed with as
    many ranks as the folder was resharded for (initialised here under torchrun). ``offload`` and
    ``materialize`` do not apply: each rank maps only its own files."""
    folder = Path(path)
    if offload or materialize:
        flag = "--offload" if offload else "--materialize"
        raise DSV3Error(
            f"{folder}: {flag} does not apply to a resharded folder (each rank maps its own files); drop it"
        )
    validate_checkpoint(folder)  # the gate (SPEC sec. 14): placement, rank indexes and files, before any work
    manifest = _read_json(folder / MANIFEST)
    placement = _read_json(folder / PLACEMENT)
    cfg = ModelConfig.from_file(folder / "config.json")
    rank, world, device = init_distributed(device)
    if world != int(manifest["num_ranks"]):
        raise DSV3Error(
            f"{folder}: resharded for {manifest['num_ranks']} ranks but running {world}; "
            f"use torchrun --nproc-per-node {manifest['num_ranks']}"
        )
    if quiet_other_ranks and rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    model = Transformer(
        cfg, dtype=dtype or torch.bfloat16, attn_impl=attn_impl, backend=backend, device=device, expert_ids=[]
    )
    _parallelize(model, cfg, placement, rank, world)
    model.set_backend(backend)
    index = _read_json(folder / manifest["ranks"][rank]["index"])
    _attach_rank(model, folder, index, device)
    _slice_unsplit(model, manifest.get("unsplit", []), rank, world)
    model.tokenizer_path = tokenizer_dir(folder)
    model.rank, model.world_size = rank, world
    return model.eval()
