"""Expert placement over GPUs (SPEC sec. 6): DeepSeek's EPLB baseline and our balanced placement.

A placement of one MoE layer is ``phy2log [P]``: physical slot p holds logical expert phy2log[p];
slots are rank-major (rank r owns slots r*P/N .. (r+1)*P/N - 1), node k owns ranks
k*N/M .. (k+1)*N/M - 1. ``imbalance`` = max over ranks of the summed per-replica load (load / number
of replicas) divided by the mean over ranks.

``balanced_placement`` ("ours") starts from EPLB's placement and only accepts improvements, so it is
never worse than EPLB. It keeps every expert group on one node when there is more than one node (it
may exchange whole groups between nodes when that lowers the busiest node), then, inside each node,
runs a local search: swap replicas between the busiest GPU and any other GPU of the node while the
pair's maximum drops (also two-for-two swaps when GPUs hold few slots), and move a redundant replica
from one expert to another when that helps after re-swapping.

Also here: ``derive`` (logcnt, log2phy), ``plan_placement`` (the placement.json object),
``load_expert_loads`` / ``uniform_loads`` (expert-load files: ours, SGLang dumps, vLLM-style tables)
and ``sglang_expert_location`` (the file SGLang's ``--init-expert-location`` reads).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dsv3tools.errors import DSV3Error

from .placement_eplb import (
    check_placement_args,
    eplb_node_groups,
    eplb_pack_node,
    eplb_placement,
    group_experts,
)

__all__ = [
    "balanced_placement",
    "derive",
    "eplb_placement",
    "imbalance",
    "load_expert_loads",
    "plan_placement",
    "sglang_expert_location",
    "uniform_loads",
]

_MAX_PARTITIONS = 5000  # enumerate group -> node partitions only up to this many
_PARTITION_CANDIDATES = 3  # best partitions (by busiest node) searched besides EPLB's
_MOVE_ROUNDS = 24  # redundant-replica moves tried per node
_PAIR_SWAP_MAX_SLOTS = 8  # two-for-two swaps only when a GPU holds at most this many slots


# ----------------------------------------------------------------------------- metrics


def derive(phy2log: np.ndarray, num_logical: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (logcnt [E] replicas per expert, log2phy [E, maxrep] slots per expert, -1 padded)."""
    p2l = np.asarray(phy2log, dtype=np.int64).ravel()
    if p2l.size and (p2l.min() < 0 or p2l.max() >= num_logical):
        raise DSV3Error(f"phy2log holds expert ids outside 0..{num_logical - 1}")
    logcnt = np.bincount(p2l, minlength=num_logical).astype(np.int64)
    maxrep = max(1, int(logcnt.max()) if logcnt.size else 1)
    log2phy = np.full((num_logical, maxrep), -1, dtype=np.int64)
    fill = np.zeros(num_logical, dtype=np.int64)
    for slot, e in enumerate(p2l.tolist()):
        log2phy[e, fill[e]] = slot
        fill[e] += 1
    return logcnt, log2phy


def _rank_loads(phy2log: np.ndarray, loads: np.ndarray, num_ranks: int) -> np.ndarray:
    p2l = np.asarray(phy2log, dtype=np.int64).ravel()
    w = np.asarray(loads, dtype=np.float64).ravel()
    if num_ranks < 1 or p2l.size % num_ranks:
        raise DSV3Error(f"{p2l.size} physical slots cannot be split evenly over {num_ranks} ranks")
    logcnt, _ = derive(p2l, w.size)
    missing = np.flatnonzero(logcnt == 0)
    if missing.size:
        raise DSV3Error(f"placement has no replica of expert(s) {missing[:8].tolist()}")
    return ((w / logcnt)[p2l]).reshape(num_ranks, -1).sum(axis=1)


def imbalance(phy2log: np.ndarray, loads: np.ndarray, num_ranks: int) -> float:
    """Max over ranks of the summed per-replica load divided by the mean over ranks (1.0 if no load)."""
    rank = _rank_loads(phy2log, loads, num_ranks)
    mean = float(rank.mean())
    return float(rank.max()) / mean if mean > 0 else 1.0


# ----------------------------------------------------------------------------- local search


def _swap_search(
    slots: np.ndarray, rw: np.ndarray, stop_at: float = 0.0, max_iter: int = 20000
) -> np.ndarray:
    """Swap replicas between the busiest GPU and others while the pair's maximum drops.

    ``slots`` [G, S] local expert indices, ``rw`` load per replica of each local expert. Every
    accepted swap strictly lowers the larger of the two GPUs involved and strictly reduces the spread,
    so the search terminates; the busiest GPU never gets busier. Stops once the busiest GPU is at or
    below ``stop_at`` (a load that some other part of the placement already reaches).
    """
    slots = slots.copy()
    g_count, s_count = slots.shape
    if g_count < 2:
        return slots
    iw = rw[slots]
    loads = iw.sum(axis=1)
    tol = 1e-12 * max(float(loads.max()), 1e-300)
    pairs = None
    if 2 <= s_count <= _PAIR_SWAP_MAX_SLOTS:
        pairs = np.array(list(itertools.combinations(range(s_count), 2)), dtype=np.int64)
    for _ in range(max_iter):
        h = int(np.argmax(loads))
        lh = loads[h]
        if lh <= stop_at:
            break
        d = iw[h][:, None, None] - iw[None, :, :]  # [S(h), G, S]
        nm = np.maximum(lh - d, loads[None, :, None] + d)
        nm[(d <= tol)] = np.inf
        nm[:, h, :] = np.inf
        idx = int(np.argmin(nm))
        if nm.flat[idx] < lh - tol:
            a, g, b = np.unravel_index(idx, nm.shape)
            slots[h, a], slots[g, b] = slots[g, b], slots[h, a]
            iw[h, a], iw[g, b] = iw[g, b], iw[h, a]
            delta = d[a, g, b]
            loads[h] -= delta
            loads[g] += delta
            continue
        if pairs is None:
            break
        # two-for-two: a pair of replicas of h against a pair of another GPU
        ph = iw[h][pairs].sum(axis=1)  # [C]
        po = iw[:, pairs].sum(axis=2)  # [G, C]
        d2 = ph[:, None, None] - po[None, :, :]  # [C, G, C]
        nm2 = np.maximum(lh - d2, loads[None, :, None] + d2)
        nm2[(d2 <= tol)] = np.inf
        nm2[:, h, :] = np.inf
        idx = int(np.argmin(nm2))
        if not nm2.flat[idx] < lh - tol:
            break
        ca, g, cb = np.unravel_index(idx, nm2.shape)
        for a, b in zip(pairs[ca], pairs[cb], strict=True):
            slots[h, a], slots[g, b] = slots[g, b], slots[h, a]
            iw[h, a], iw[g, b] = iw[g, b], iw[h, a]
        delta = d2[ca, g, cb]
        loads[h] -= delta
        loads[g] += delta
    return slots


def _node_max(slots: np.ndarray, wl: np.ndarray) -> float:
    cnt = np.bincount(slots.ravel(), minlength=wl.size)
    return float((wl / np.maximum(cnt, 1))[slots].sum(axis=1).max())


def _replica_moves(slots: np.ndarray, wl: np.ndarray, top: int) -> list[tuple[int, int, int]]:
    """Candidate moves (gpu, slot, new expert): give a replica of an expert on the busiest GPU,
    taken from an expert with >= 2 replicas; the best ``top`` by the busiest GPU right after."""
    g_count, s_count = slots.shape
    n = wl.size
    cnt = np.bincount(slots.ravel(), minlength=n)
    rw = wl / cnt
    per_gpu = np.zeros((g_count, n), dtype=np.float64)
    np.add.at(per_gpu, (np.repeat(np.arange(g_count), s_count), slots.ravel()), 1.0)
    loads = per_gpu @ rw
    h = int(np.argmax(loads))
    rem = np.flatnonzero(cnt[slots.ravel()] >= 2)  # flat slot positions that can give a replica
    if rem.size == 0:
        return []
    rem_g, rem_e = rem // s_count, slots.ravel()[rem]
    new_rw_e = wl[rem_e] / (cnt[rem_e] - 1)
    base = loads[None, :] + per_gpu[:, rem_e].T * (new_rw_e - rw[rem_e])[:, None]  # [R, G]
    rows = np.arange(rem.size)
    out: list[tuple[float, int, int, int]] = []
    for f in np.unique(slots[h]).tolist():
        new_rw_f = wl[f] / (cnt[f] + 1)
        cand = base + per_gpu[:, f][None, :] * (new_rw_f - rw[f])
        cand[rows, rem_g] += new_rw_f - new_rw_e
        score = cand.max(axis=1)
        score[rem_e == f] = np.inf
        for i in np.argsort(score, kind="stable")[:top].tolist():
            if np.isfinite(score[i]):
                out.append((float(score[i]), int(rem_g[i]), int(rem[i] % s_count), int(f)))
    out.sort()
    return [(g, s, f) for _, g, s, f in out[:top]]


def _optimize_node(slots: np.ndarray, wl: np.ndarray, stop_at: float = 0.0) -> np.ndarray:
    """Improve one node's [G, S] layout of local expert indices; never returns a worse one."""
    cnt = np.bincount(slots.ravel(), minlength=wl.size)
    best = _swap_search(slots, wl / cnt, stop_at)
    best_max = _node_max(best, wl)
    if best.size == wl.size:  # no redundant replicas to move
        return best
    bound = max(float(wl.sum()) / best.shape[0] * (1 + 1e-9), stop_at)
    for _ in range(_MOVE_ROUNDS):
        if best_max <= bound:
            break
        improved = False
        for g, s, f in _replica_moves(best, wl, top=3):
            trial = best.copy()
            trial[g, s] = f
            trial = _swap_search(trial, wl / np.bincount(trial.ravel(), minlength=wl.size), stop_at)
            trial_max = _node_max(trial, wl)
            if trial_max < best_max * (1 - 1e-12):
                best, best_max, improved = trial, trial_max, True
                break
        if not improved:
            break
    return best


def _partitions(items: list[int], block: int) -> Iterable[list[tuple[int, ...]]]:
    """All partitions of ``items`` into unordered blocks of ``block`` items."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for combo in itertools.combinations(rest, block - 1):
        left = [x for x in rest if x not in combo]
        for tail in _partitions(left, block):
            yield [(first, *combo), *tail]


def _num_partitions(n: int, block: int) -> int:
    parts = n // block
    return math.factorial(n) // (math.factorial(block) ** parts * math.factorial(parts))


def balanced_placement(
    loads: np.ndarray, num_ranks: int, num_nodes: int, num_groups: int, num_redundant: int
) -> np.ndarray:
    """Our placement of one MoE layer: phy2log [P]; never a higher imbalance than ``eplb_placement``.

    Same arguments, rules and errors as ``eplb_placement``. With more than one node (hierarchical
    policy) every expert group stays whole on one node; the group -> node assignment is EPLB's unless
    exchanging whole groups between nodes gives a lower imbalance.
    """
    w, p, hierarchical = check_placement_args(loads, num_ranks, num_nodes, num_groups, num_redundant)
    eplb = eplb_placement(w, num_ranks, num_nodes, num_groups, num_redundant)
    if float(w.sum()) <= 0:
        return eplb
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    group_size = w.size // groups
    gpus = num_ranks // nodes
    cache: dict[tuple[int, ...], tuple[np.ndarray, float, float]] = {}

    def node_layout(node_groups: list[int], stop_at: float) -> tuple[np.ndarray, float]:
        key = tuple(node_groups)
        if key not in cache or cache[key][2] > stop_at:  # (re)optimize at least as far as asked
            ids = group_experts(node_groups, group_size)
            start = eplb_pack_node(w, ids, p // nodes, gpus)  # EPLB's layout of this node
            local = {int(e): i for i, e in enumerate(ids.tolist())}
            slots = np.vectorize(local.__getitem__, otypes=[np.int64])(start)
            local_opt = _optimize_node(slots, w[ids], stop_at)
            cache[key] = (ids[local_opt], _node_max(local_opt, w[ids]), stop_at)
        return cache[key][0], cache[key][1]

    group_w = w.reshape(groups, -1).sum(axis=1)
    eplb_nodes = eplb_node_groups(w, groups, nodes)
    candidates = [eplb_nodes]
    if nodes > 1 and groups > nodes and _num_partitions(groups, groups // nodes) <= _MAX_PARTITIONS:
        scored = sorted(
            (max(float(group_w[list(b)].sum()) for b in part), part)
            for part in _partitions(list(range(groups)), groups // nodes)
        )
        eplb_sets = sorted(tuple(sorted(b)) for b in eplb_nodes)
        for _, part in scored[:_PARTITION_CANDIDATES]:
            if sorted(part) != eplb_sets:
                candidates.append([sorted(b) for b in part])

    best, best_max = eplb, imbalance(eplb, w, num_ranks) * float(w.sum()) / num_ranks
    for cand in candidates:
        totals = [float(group_w[b].sum()) for b in cand]
        reached = max(totals) / gpus  # no node of this candidate can do better than its mean
        if reached >= best_max * (1 - 1e-12):
            continue
        layouts: list[np.ndarray | None] = [None] * len(cand)
        for k in sorted(range(len(cand)), key=lambda i: -totals[i]):  # busiest node first
            layouts[k], node_max = node_layout(cand[k], reached)
            reached = max(reached, node_max)
        if reached < best_max * (1 - 1e-12):
            best, best_max = np.concatenate([lay.ravel() for lay in layouts if lay is not None]), reached
    if imbalance(best, w, num_ranks) <= imbalance(eplb, w, num_ranks):
        return best
    return eplb


# ----------------------------------------------------------------------------- plans and files


def plan_placement(
    loads: dict[int, np.ndarray],
    num_ranks: int,
    num_nodes: int,
    num_groups: int,
    num_redundant: int,
    policy: str = "ours",
) -> dict[str, Any]:
    """The placement.json object (SPEC sec. 6) for every MoE layer in ``loads`` (layer id -> [E]).

    ``layers["<id>"]`` holds ``phy2log`` (the chosen policy), ``imbalance`` (its imbalance under the
    loads) and ``imbalance_eplb`` (EPLB's, for comparison).
    """
    if policy not in ("ours", "eplb"):
        raise DSV3Error(f"unknown placement policy {policy!r}; use 'ours' or 'eplb'")
    if not loads:
        raise DSV3Error("no MoE layers to place")
    sizes = {int(np.asarray(v).size) for v in loads.values()}
    if len(sizes) != 1:
        raise DSV3Error(f"expert loads of different lengths across layers: {sorted(sizes)}")
    num_logical = sizes.pop()
    num_physical = num_logical + int(num_redundant)
    layers: dict[str, dict[str, Any]] = {}
    for layer_id in sorted(int(k) for k in loads):
        w = np.asarray(loads[layer_id], dtype=np.float64)
        eplb = eplb_placement(w, num_ranks, num_nodes, num_groups, num_redundant)
        imb_eplb = imbalance(eplb, w, num_ranks)
        if policy == "ours":
            chosen = balanced_placement(w, num_ranks, num_nodes, num_groups, num_redundant)
            imb = imbalance(chosen, w, num_ranks)
        else:
            chosen, imb = eplb, imb_eplb
        layers[str(layer_id)] = {
            "phy2log": [int(x) for x in chosen],
            "imbalance": round(imb, 6),
            "imbalance_eplb": round(imb_eplb, 6),
        }
    return {
        "num_ranks": int(num_ranks),
        "num_nodes": int(num_nodes),
        "num_physical": num_physical,
        "num_logical": num_logical,
        "policy": policy,
        "layers": layers,
    }


def uniform_loads(moe_layer_ids: Iterable[int], num_experts: int) -> dict[int, np.ndarray]:
    """Equal load on every expert of every MoE layer (the fallback when no expert-load file is given)."""
    return {int(i): np.ones(num_experts, dtype=np.float64) for i in moe_layer_ids}


def _read_any(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(path.read_text())
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".pt":
            import torch

            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DSV3Error(f"{path}: expert-load file not found") from None
    except Exception as exc:  # unreadable or corrupt file: one line, no traceback
        raise DSV3Error(f"{path}: cannot read expert loads ({type(exc).__name__}: {exc})") from None
    raise DSV3Error(f"{path}: unknown expert-load file type {suffix!r}; use .json, .pt or .npy")


def _to_array(path: Path, value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DSV3Error(f"{path}: {what} is not a numeric table") from None
    if not np.all(np.isfinite(arr)) or bool((arr < 0).any()):
        raise DSV3Error(f"{path}: {what} holds negative or non-finite token counts")
    return arr


def load_expert_loads(
    path: str | Path,
    moe_layer_ids: list[int],
    num_experts: int,
    num_hidden_layers: int | None = None,
) -> dict[int, np.ndarray]:
    """Read tokens per expert for each MoE layer (layer id -> float64 [num_experts]).

    Accepted forms:

    * our JSON ``{"layers": {"<layer id>": [tokens per expert, ...]}}`` (from ``expert-load``);
      MoE layers it does not list (e.g. the MTP layer) get uniform loads;
    * an SGLang expert-distribution dump (``.pt`` or ``.json`` dict with ``logical_count``
      [steps, num_hidden_layers, E] or [num_hidden_layers, E]): summed over steps, rows = layer ids;
    * a table (JSON nested list, ``.pt`` tensor or ``.npy``) shaped [number of MoE layers, E] (vLLM
      style, rows = MoE layers in order; with or without the MTP layers) or [num_hidden_layers, E]
      (rows = layer ids).

    ``num_hidden_layers`` (config value, 61 for DeepSeek-V3) tells main layers from MTP layers
    (ids >= it); default: every id in ``moe_layer_ids`` is a main layer. Layers a table or dump does
    not cover (MTP) get uniform loads. Wrong shapes raise DSV3Error naming the file, the shape found
    and the shapes accepted.
    """
    p = Path(path)
    ids = [int(i) for i in moe_layer_ids]
    e = int(num_experts)
    nh = int(num_hidden_layers) if num_hidden_layers is not None else (max(ids) + 1 if ids else 0)
    out = uniform_loads(ids, e)
    data = _read_any(p)
    if isinstance(data, dict) and "layers" in data:
        _fill_from_layers(p, data["layers"], out, e)
    elif isinstance(data, dict) and "logical_count" in data:
        _fill_from_sglang(p, data["logical_count"], out, e, nh)
    elif isinstance(data, dict):
        raise DSV3Error(
            f'{p}: unknown expert-load JSON/dict (keys {list(data)[:5]}); expected "layers" or "logical_count"'
        )
    else:
        _fill_from_table(p, data, out, e, nh)
    return out


def _fill_from_layers(p: Path, layers: Any, out: dict[int, np.ndarray], e: int) -> None:
    """Our ``{"layers": {"<layer id>": [...]}}`` form: rows keyed by layer id."""
    if not isinstance(layers, dict):
        raise DSV3Error(f'{p}: "layers" must map layer ids to lists of {e} token counts')
    matched = 0
    for key, row in layers.items():
        try:
            lid = int(key)
        except (TypeError, ValueError):
            raise DSV3Error(f"{p}: layer key {key!r} is not a layer id") from None
        arr = _to_array(p, row, f"layer {lid}")
        if arr.shape != (e,):
            raise DSV3Error(
                f"{p}: layer {lid} has shape {list(arr.shape)}; expected [{e}] (one count per expert)"
            )
        if lid in out:
            out[lid] = arr
            matched += 1
    if layers and not matched:
        raise DSV3Error(
            f"{p}: none of its layers {sorted(layers, key=str)[:6]} is a MoE layer of this model "
            f"({sorted(out)[:3]}...)"
        )


def _fill_from_sglang(p: Path, counts: Any, out: dict[int, np.ndarray], e: int, nh: int) -> None:
    """An SGLang dump's ``logical_count`` ([steps, layers, E] or [layers, E]), summed over steps."""
    arr = _to_array(p, counts, "logical_count")
    if arr.ndim == 3:
        arr = arr.sum(axis=0)
    if arr.ndim != 2 or arr.shape[1] != e or arr.shape[0] < nh:
        raise DSV3Error(
            f"{p}: SGLang logical_count has shape {list(np.shape(counts))}; "
            f"expected [steps, {nh}, {e}] or [{nh}, {e}]"
        )
    for lid in out:
        if lid < nh:
            out[lid] = arr[lid]


def _fill_from_table(p: Path, data: Any, out: dict[int, np.ndarray], e: int, nh: int) -> None:
    """A bare table: rows = MoE layers in order (with or without MTP) or rows = layer ids."""
    ids = list(out)
    main = [i for i in ids if i < nh]
    arr = _to_array(p, data, "expert-load table")
    accepted = {
        len(main): main,
        len(ids): ids,
        nh: list(range(nh)),
        max(ids, default=-1) + 1: list(range(max(ids, default=-1) + 1)),
    }
    if arr.ndim != 2 or arr.shape[1] != e or arr.shape[0] not in accepted:
        shapes = ", ".join(f"[{n}, {e}]" for n in sorted(accepted))
        raise DSV3Error(
            f"{p}: expert-load table has shape {list(arr.shape)}; accepted: {shapes} "
            f"(rows = MoE layers in order, or rows = layer ids) or an SGLang dump with logical_count"
        )
    for r, lid in enumerate(accepted[arr.shape[0]]):
        if lid in out:
            out[lid] = arr[r]


def sglang_expert_location(placement: dict[str, Any], num_hidden_layers: int | None = None) -> dict[str, Any]:
    """The placement as SGLang's ``--init-expert-location FILE`` reads it: ``{"physical_to_logical_map": [...]}``.

    What SGLang does (``python/sglang/srt/eplb/expert_location.py``,
    ``compute_initial_expert_location_metadata``): it loads the file (``.pt`` via torch.load, ``.json``
    via json) and, when the dict has ``physical_to_logical_map``, calls
    ``ExpertLocationMetadata.init_by_mapping(server_args, model_config, **data)`` -- so the dict must
    hold that one key and nothing else. The map is [num_layers, num_physical] with num_layers =
    config ``num_hidden_layers`` (61 for DeepSeek-V3: the MTP layer is not part of it) and
    num_physical = n_routed_experts + ``--ep-num-redundant-experts``, a multiple of the EP size;
    slots are rank-major like ours. Layers without a placement (dense layers 0-2) get SGLang's
    trivial map ``arange(P) % E`` (what its ``init_trivial`` uses); layers with id >= num_hidden_layers
    (MTP) are dropped. Default ``num_hidden_layers``: one past the largest layer id in the placement.
    Start SGLang with ``--ep-num-redundant-experts R`` matching this placement.
    """
    try:
        num_physical = int(placement["num_physical"])
        num_logical = int(placement["num_logical"])
        layers = {int(k): v["phy2log"] for k, v in placement["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DSV3Error(
            "not a placement object: needs num_physical, num_logical and layers.<id>.phy2log"
        ) from None
    nh = int(num_hidden_layers) if num_hidden_layers is not None else max(layers, default=-1) + 1
    trivial = [i % num_logical for i in range(num_physical)]
    table = []
    for lid in range(nh):
        row = layers.get(lid, trivial)
        if len(row) != num_physical:
            raise DSV3Error(f"placement layer {lid} has {len(row)} slots, expected {num_physical}")
        table.append([int(x) for x in row])
    return {"physical_to_logical_map": table}
