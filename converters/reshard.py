"""``dsv3tools reshard``: lay a checkpoint out over N ranks (SPEC sec. 6) -- expert placement with
redundant replicas, per-rank tensor-parallel slices, per-rank files written streaming and resumable.

Output of ``--format dsv3tools`` (default), one folder:

* ``rank{r}-0000k-of-00000K.safetensors`` + ``rank{r}.safetensors.index.json`` for each rank r: HF tensor
  names; tensor-parallel tensors hold rank r's slice under the original name (rules in
  ``reshard_rules``); routed experts are stored once per *physical slot* under
  ``model.layers.L.mlp.slots.{p}.{gate,up,down}_proj.*`` where p is the global slot index and
  ``placement.json``'s ``phy2log[p]`` is the logical expert it holds (so a replica is a slot whose
  expert also sits in another slot; every rank stores exactly P/N slots per MoE layer);
* a tensor-parallel FP8 linear whose slice would cut a 128-block (tiny presets; DeepSeek-V3's dense MLP
  at N=32) is stored whole on every rank and listed under ``unsplit`` in reshard.json; the distributed
  loader dequantizes it to bf16 and takes the rank's slice (``--format deepseek`` refuses instead);
* ``placement.json`` (``num_ranks``, ``num_nodes``, ``num_physical``, ``layers``), ``sglang_expert_location.json``
  (SGLang ``--init-expert-location``), ``reshard.json`` (format, ranks and their index files, naming),
  ``config.json`` and the tokenizer files, all written last.

``--format deepseek`` writes ``model{r}-mp{N}.safetensors`` for DeepSeek's inference demo
(``reshard_deepseek``). One :class:`WriteJob` covers every rank file, so a re-run resumes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3tools.checkpoint.layout import layer_of
from dsv3tools.checkpoint.reader import Checkpoint, TensorInfo
from dsv3tools.checkpoint.writer import (
    DEFAULT_SHARD_BYTES,
    OutSpec,
    ShardPlan,
    WriteJob,
    execute,
    non_weight_files,
    plan_shards,
)
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error

from .placement import load_expert_loads, plan_placement, sglang_expert_location, uniform_loads
from .reshard_deepseek import contiguous_phy2log, demo_config, demo_name
from .reshard_rules import (
    Piece,
    check_split,
    cuts_fp8_block,
    expert_tensor,
    module_of,
    placement_slots,
    slot_name,
    split_rule,
    split_shape,
)

MANIFEST = "reshard.json"
PLACEMENT = "placement.json"
SGLANG_FILE = "sglang_expert_location.json"
FORMATS = ("dsv3tools", "deepseek")


@dataclass(frozen=True)
class ReshardOptions:
    """Everything ``reshard`` is asked to do (CLI flags)."""

    num_ranks: int
    num_nodes: int = 1
    num_redundant: int = 0
    expert_load: str | None = None
    policy: str = "ours"
    fmt: str = "dsv3tools"
    keep_mtp: bool = True
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


def rank_index_name(rank: int) -> str:
    return f"rank{rank}.safetensors.index.json"


def _check_options(cfg: ModelConfig, opt: ReshardOptions) -> None:
    if opt.fmt not in FORMATS:
        raise DSV3Error(f"--format {opt.fmt!r}: use dsv3tools or deepseek")
    if opt.num_ranks < 1:
        raise DSV3Error(f"--gpus {opt.num_ranks}: must be >= 1")
    if opt.num_nodes < 1 or opt.num_ranks % opt.num_nodes:
        raise DSV3Error(
            f"--gpus {opt.num_ranks} must be a multiple of --nodes {opt.num_nodes} (same GPUs per node)"
        )
    if opt.num_nodes > 1 and cfg.n_group % opt.num_nodes:
        raise DSV3Error(
            f"--nodes {opt.num_nodes} must divide the {cfg.n_group} expert groups (n_group) for the hierarchical "
            "policy, which keeps each group on one node; use --nodes 1 for the global policy"
        )
    if cfg.quant.method == "int4":
        raise DSV3Error("reshard supports FP8 and BF16 checkpoints; convert --to fp8 (or bf16) first")
    if opt.fmt == "deepseek":
        if cfg.family not in ("v3", "v3.1", "v3.2"):
            raise DSV3Error(
                f"--format deepseek: DeepSeek's demo loads v3, v3.1 and v3.2 only, this is {cfg.family}; "
                "use --format dsv3tools"
            )
        if opt.num_redundant:
            raise DSV3Error(
                "--format deepseek holds no redundant experts (the demo places experts contiguously); drop --redundant-experts"
            )
        if cfg.n_routed_experts % opt.num_ranks:
            raise DSV3Error(
                f"--format deepseek: {cfg.n_routed_experts} experts are not divisible by --gpus {opt.num_ranks} "
                "(rank r holds experts r*E/N ..)"
            )


def _moe_layers(cfg: ModelConfig, opt: ReshardOptions) -> list[int]:
    keep_mtp = opt.keep_mtp and opt.fmt == "dsv3tools"
    return [lid for lid in cfg.moe_layers if keep_mtp or lid < cfg.num_hidden_layers]


def make_placement(cfg: ModelConfig, opt: ReshardOptions) -> dict[str, Any]:
    """The placement.json object for these options (deepseek format: contiguous, no replicas)."""
    layers = _moe_layers(cfg, opt)
    e = cfg.n_routed_experts
    if opt.expert_load:
        loads = load_expert_loads(opt.expert_load, layers, e, cfg.num_hidden_layers)
    else:
        loads = uniform_loads(layers, e)
    if opt.fmt == "dsv3tools":
        return plan_placement(loads, opt.num_ranks, opt.num_nodes, cfg.n_group, opt.num_redundant, opt.policy)
    from .placement import imbalance

    p2l = contiguous_phy2log(e)
    return {
        "num_ranks": opt.num_ranks,
        "num_nodes": opt.num_nodes,
        "num_physical": e,
        "num_logical": e,
        "policy": "contiguous",
        "layers": {
            str(lid): {
                "phy2log": p2l,
                "imbalance": round(imbalance(np.asarray(p2l), loads[lid], opt.num_ranks), 6),
            }
            for lid in layers
        },
    }


def _source_order(ckpt: Checkpoint, keep_layer) -> list[TensorInfo]:
    infos = [i for i in ckpt.infos().values() if keep_layer(layer_of(i.name))]
    order = {s: k for k, s in enumerate(ckpt.shards)}
    return sorted(infos, key=lambda i: (order[i.shard], i.offsets[0]))


def unsplit_modules(ckpt: Checkpoint, opt: ReshardOptions) -> list[str]:
    """Linears kept whole on every rank because their FP8 split would cut a block (dsv3tools format);
    the deepseek format refuses them with the rule that was broken."""
    cfg, n = ckpt.config, opt.num_ranks
    keep_mtp = opt.keep_mtp and opt.fmt == "dsv3tools"
    bad = sorted(
        i.name
        for i in ckpt.infos().values()
        if cuts_fp8_block(i.name, i.shape, i.dtype, cfg, n)
        and (keep_mtp or not _is_mtp(layer_of(i.name), cfg))
    )
    if bad and opt.fmt == "deepseek":
        info = ckpt.info(bad[0])
        check_split(info.name, info.shape, info.dtype, cfg, n)
    return [module_of(name) for name in bad]


def _split_specs(info: TensorInfo, cfg: ModelConfig, n: int, rename, unsplit: set[str]) -> list[OutSpec]:
    """One OutSpec per rank for a non-expert tensor: its slice, or the whole tensor."""
    rule = split_rule(info.name)
    if rule is None or n == 1 or module_of(info.name) in unsplit:
        return [OutSpec(rename(info.name), info.dtype, info.shape, Piece(info.name))] * n
    check_split(info.name, info.shape, info.dtype, cfg, n)
    dim = rule[0]
    shape = split_shape(info.shape, dim, n)
    return [OutSpec(rename(info.name), info.dtype, shape, Piece(info.name, dim, r, n)) for r in range(n)]


def rank_specs(
    ckpt: Checkpoint, placement: dict[str, Any], opt: ReshardOptions, unsplit: list[str] | None = None
) -> list[list[OutSpec]]:
    """The output tensors of every rank, in source order (a layer's experts where its first one was);
    modules in ``unsplit`` are whole on every rank."""
    cfg, n = ckpt.config, opt.num_ranks
    whole = set(unsplit or ())
    keep_mtp = opt.keep_mtp and opt.fmt == "dsv3tools"
    infos = _source_order(ckpt, lambda lid: keep_mtp or not _is_mtp(lid, cfg))
    parsed = {i.name: expert_tensor(i.name) for i in infos}
    experts: dict[tuple[int, int], list[TensorInfo]] = defaultdict(list)
    for info in infos:
        ex = parsed[info.name]
        if ex:
            experts[(ex[0], ex[1])].append(info)
    deepseek = opt.fmt == "deepseek"
    rename = demo_name if deepseek else (lambda s: s)
    out: list[list[OutSpec]] = [[] for _ in range(n)]
    placed: set[int] = set()
    for info in infos:
        ex = parsed[info.name]
        if ex is None:
            for r, spec in enumerate(_split_specs(info, cfg, n, rename, whole)):
                out[r].append(spec)
            continue
        layer = ex[0]
        if layer in placed:
            continue
        placed.add(layer)
        lp = placement["layers"].get(str(layer))
        if lp is None:
            raise DSV3Error(f"placement has no layer {layer}, but the checkpoint holds its routed experts")
        for r in range(n):
            for slot, e in placement_slots(lp["phy2log"], n, r):
                for src in experts.get((layer, e), []):
                    rest = parsed[src.name][2]
                    name = demo_name(src.name) if deepseek else slot_name(layer, slot, rest)
                    out[r].append(OutSpec(name, src.dtype, src.shape, Piece(src.name)))
    return out


class _Producer:
    """Reads each source tensor through mmap and cuts the rank's slice."""

    def __init__(self, path: Path):
        self.path = path
        self._ckpt: Checkpoint | None = None

    def __call__(self, spec: OutSpec) -> torch.Tensor:
        if self._ckpt is None:
            self._ckpt = Checkpoint(self.path)
        piece: Piece = spec.key
        t = self._ckpt.get(piece.src)
        if piece.dim is not None:
            size = t.shape[piece.dim] // piece.parts
            t = t.narrow(piece.dim, piece.index * size, size)
        return t.contiguous()


def _rank_shards(specs: list[list[OutSpec]], opt: ReshardOptions) -> list[list[ShardPlan]]:
    if opt.fmt == "deepseek":
        return [[ShardPlan(f"model{r}-mp{opt.num_ranks}.safetensors", s)] for r, s in enumerate(specs)]
    return [plan_shards(s, opt.max_shard_bytes, prefix=f"rank{r}") for r, s in enumerate(specs)]


def _byte_summary(ckpt: Checkpoint, specs: list[list[OutSpec]], placement: dict, opt: ReshardOptions) -> dict:
    """Per-rank bytes and how the total splits into source, replica copies and whole-tensor copies."""
    cfg = ckpt.config
    per_rank = [sum(s.nbytes for s in rs) for rs in specs]
    src_bytes = sum(i.nbytes for i in ckpt.infos().values())
    keep_mtp = opt.keep_mtp and opt.fmt == "dsv3tools"
    dropped = (
        0 if keep_mtp else sum(i.nbytes for i in ckpt.infos().values() if _is_mtp(layer_of(i.name), cfg))
    )
    whole = sum(s.nbytes for s in specs[0] if s.key.dim is None and not _is_expert(s))
    expert_bytes = _expert_bytes(ckpt)
    replica = sum(
        (len(lp["phy2log"]) - cfg.n_routed_experts) * expert_bytes.get(int(lid), 0)
        for lid, lp in placement["layers"].items()
    )
    return {
        "bytes_per_rank": per_rank,
        "total_bytes": sum(per_rank),
        "source_bytes": src_bytes,
        "dropped_bytes": dropped,
        "replica_bytes": replica,
        "whole_copy_bytes": whole * (opt.num_ranks - 1),
    }


def _is_mtp(layer: int | None, cfg: ModelConfig) -> bool:
    return layer is not None and layer >= cfg.num_hidden_layers


def _is_expert(spec: OutSpec) -> bool:
    return expert_tensor(spec.key.src) is not None


def _expert_bytes(ckpt: Checkpoint) -> dict[int, int]:
    """Bytes of one routed expert (weights + scales) per MoE layer (expert 0 as the measure)."""
    out: dict[int, int] = defaultdict(int)
    for info in ckpt.infos().values():
        ex = expert_tensor(info.name)
        if ex and ex[1] == 0:
            out[ex[0]] += info.nbytes
    return dict(out)


def plan_reshard(model: str | Path, opt: ReshardOptions) -> dict[str, Any]:
    """Placement, per-rank tensors and shards, byte totals; reads headers only."""
    ckpt = Checkpoint(model)
    cfg = ckpt.config
    _check_options(cfg, opt)
    unsplit = unsplit_modules(ckpt, opt)
    placement = make_placement(cfg, opt)
    specs = rank_specs(ckpt, placement, opt, unsplit)
    shards = _rank_shards(specs, opt)
    summary = {**_byte_summary(ckpt, specs, placement, opt), "unsplit": unsplit}
    return {"ckpt": ckpt, "placement": placement, "specs": specs, "shards": shards, "summary": summary}


def _extra_data(plan: dict, opt: ReshardOptions, model: Path) -> tuple[dict, dict]:
    cfg: ModelConfig = plan["ckpt"].config
    placement = plan["placement"]
    keep_mtp = opt.keep_mtp and opt.fmt == "dsv3tools"
    config = cfg.to_dict() if keep_mtp else cfg.to_dict(num_nextn_predict_layers=0)
    manifest: dict[str, Any] = {
        "format": opt.fmt,
        "num_ranks": opt.num_ranks,
        "num_nodes": opt.num_nodes,
        "expert_naming": "slots" if opt.fmt == "dsv3tools" else "contiguous",
        "ranks": [],
        "bytes_per_rank": plan["summary"]["bytes_per_rank"],
        "unsplit": plan["summary"]["unsplit"],
        "source": str(model.resolve()),
    }
    data: dict[str, object] = {PLACEMENT: placement}
    if opt.fmt == "dsv3tools":
        data[SGLANG_FILE] = sglang_expert_location(placement, cfg.num_hidden_layers)
        for r, shards in enumerate(plan["shards"]):
            wm = {t.name: s.filename for s in shards for t in s.tensors}
            total = sum(s.nbytes for s in shards)
            data[rank_index_name(r)] = {
                "metadata": {"total_size": total, "rank": r},
                "weight_map": dict(sorted(wm.items())),
            }
            manifest["ranks"].append(
                {"rank": r, "index": rank_index_name(r), "files": [s.filename for s in shards]}
            )
    else:
        data["config_demo.json"] = demo_config(cfg)
        manifest["ranks"] = [{"rank": r, "files": [s[0].filename]} for r, s in enumerate(plan["shards"])]
    data[MANIFEST] = manifest
    return data, config


def reshard(
    model: str | Path,
    out: str | Path,
    opt: ReshardOptions,
    dry_run: bool = False,
    workers: int = 1,
    on_shard=None,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan (unless ``plan`` from :func:`plan_reshard` is given) and, unless ``dry_run``, write the per-rank
    checkpoint; returns the placement, bytes per rank and the byte totals (plus the writer's result)."""
    model = Path(model)
    plan = plan or plan_reshard(model, opt)
    result: dict[str, Any] = {
        "model": str(model),
        "out": str(out),
        "format": opt.fmt,
        "num_ranks": opt.num_ranks,
        "placement": plan["placement"],
        **plan["summary"],
        "dry_run": dry_run,
    }
    if dry_run:
        return result
    data, config = _extra_data(plan, opt, model)
    job = WriteJob(
        Path(out),
        [s for rs in plan["shards"] for s in rs],
        _Producer(model),
        config,
        "reshard",
        {
            "format": opt.fmt,
            "gpus": opt.num_ranks,
            "nodes": opt.num_nodes,
            "redundant": opt.num_redundant,
            "policy": opt.policy,
            "keep_mtp": opt.keep_mtp,
            "expert_load": opt.expert_load,
            "placement": _placement_fingerprint(plan["placement"]),
        },
        extra_files=non_weight_files(model),
        extra_data=data,
        index_name=None,
    )
    result.update(execute(job, workers=workers, on_shard=on_shard))
    return result


def _placement_fingerprint(placement: dict) -> str:
    from dsv3tools.checkpoint.writer import plan_fingerprint

    return plan_fingerprint({k: v["phy2log"] for k, v in placement["layers"].items()})
