"""DeepSeek's EPLB greedy expert placement (the baseline of SPEC sec. 6), re-implemented in numpy.

The algorithm follows DeepSeek's published EPLB (``deepseek-ai/EPLB``, ``eplb.py``) step by step:

* hierarchical policy, used when the number of nodes divides the number of expert groups:
  1. pack whole expert groups onto nodes, heaviest group first, each into the node with the least
     load that still has room (every node gets the same number of groups);
  2. inside each node, add the node's share of redundant replicas one at a time, each to the expert
     with the highest load per replica (first index on ties);
  3. pack the node's replicas onto its GPUs the same way as step 1 (heaviest first, least-loaded GPU
     with a free slot, the same number of slots per GPU);
* global policy otherwise: the same with one group and one node.

Slots are rank-major: rank r owns slots ``r*P/N .. (r+1)*P/N - 1``; node k owns ranks
``k*N/M .. (k+1)*N/M - 1``; inside a rank, slots are in the order the replicas were packed.
Loads are handled in float64 and ties are broken by a stable descending sort (the reference uses an
unstable float32 sort, so only exact ties can order differently).
"""

from __future__ import annotations

import numpy as np

from dsv3tools.errors import DSV3Error

__all__ = [
    "balanced_packing",
    "check_placement_args",
    "eplb_node_groups",
    "eplb_pack_node",
    "eplb_placement",
    "replicate_experts",
]


def _as_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DSV3Error(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise DSV3Error(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_placement_args(
    loads: np.ndarray, num_ranks: int, num_nodes: int, num_groups: int, num_redundant: int
) -> tuple[np.ndarray, int, bool]:
    """Validate placement inputs; return (loads as float64, number of physical slots, hierarchical).

    Raises DSV3Error naming the rule that was broken and a way to fix it.
    """
    w = np.asarray(loads, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise DSV3Error(
            f"expert loads must be a non-empty 1-D array (one value per expert), got shape {w.shape}"
        )
    if not np.all(np.isfinite(w)) or bool((w < 0).any()):
        raise DSV3Error("expert loads must be finite and non-negative")
    n = _as_int("--gpus (num_ranks)", num_ranks, 1)
    m = _as_int("--nodes (num_nodes)", num_nodes, 1)
    g = _as_int("num_groups", num_groups, 1)
    r = _as_int("--redundant-experts (num_redundant)", num_redundant, 0)
    e = w.size
    if n % m:
        raise DSV3Error(
            f"--gpus {n} must be a multiple of --nodes {m} (every node has the same number of GPUs)"
        )
    if e % g:
        raise DSV3Error(f"{e} experts cannot be split into {g} equal expert groups")
    p = e + r
    if p % n:
        fix = (-e) % n
        raise DSV3Error(
            f"{e} experts + {r} redundant = {p} physical slots is not a multiple of --gpus {n}; "
            f"use --redundant-experts {fix} (or {fix} plus a multiple of {n})"
        )
    hierarchical = g % m == 0
    if hierarchical and r % m:
        raise DSV3Error(
            f"--redundant-experts {r} must be a multiple of --nodes {m} (each node gets the same number "
            "of redundant replicas under the hierarchical policy)"
        )
    return w, p, hierarchical


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into ``num_packs`` packs of exactly n/num_packs items, heaviest first.

    Each item goes to the pack with the smallest total weight among the packs that still have room
    (lowest pack index on ties). Returns (pack_index [n], rank_in_pack [n]).
    """
    w = np.asarray(weight, dtype=np.float64)
    n = w.size
    if num_packs <= 0 or n % num_packs:
        raise DSV3Error(f"cannot pack {n} items into {num_packs} equal packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    order = np.argsort(-w, kind="stable")
    pack_index = np.full(n, -1, dtype=np.int64)
    rank_in_pack = np.full(n, -1, dtype=np.int64)
    pack_weight = [0.0] * num_packs
    pack_items = [0] * num_packs
    for item in order.tolist():
        best = -1
        best_w = 0.0
        for k in range(num_packs):
            if pack_items[k] < per_pack and (best < 0 or pack_weight[k] < best_w):
                best, best_w = k, pack_weight[k]
        pack_index[item] = best
        rank_in_pack[item] = pack_items[best]
        pack_weight[best] += float(w[item])
        pack_items[best] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_physical - n`` extra replicas, each to the expert with the most load per replica.

    Returns (phy2log [num_physical]: slot i < n holds expert i, later slots the extra replicas in the
    order they were added; logcnt [n]).
    """
    w = np.asarray(weight, dtype=np.float64)
    n = w.size
    if num_physical < n:
        raise DSV3Error(f"{num_physical} physical slots cannot hold {n} experts")
    phy2log = np.arange(num_physical, dtype=np.int64)
    logcnt = np.ones(n, dtype=np.int64)
    for i in range(n, num_physical):
        e = int(np.argmax(w / logcnt))
        phy2log[i] = e
        logcnt[e] += 1
    return phy2log, logcnt


def eplb_node_groups(loads: np.ndarray, num_groups: int, num_nodes: int) -> list[list[int]]:
    """Step 1 of the hierarchical policy: the expert groups of each node, in packing order."""
    w = np.asarray(loads, dtype=np.float64)
    group_w = w.reshape(num_groups, -1).sum(axis=1)
    pack, rank = balanced_packing(group_w, num_nodes)
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    for grp in sorted(range(num_groups), key=lambda x: (pack[x], rank[x])):
        nodes[int(pack[grp])].append(grp)
    return nodes


def eplb_pack_node(loads: np.ndarray, expert_ids: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """Steps 2-3 for one node: replicate its experts and pack the replicas onto its GPUs.

    ``expert_ids`` are the node's logical experts in EPLB order; returns [num_gpus, slots per GPU]
    logical expert ids.
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    wl = np.asarray(loads, dtype=np.float64)[ids]
    phy2m, cnt = replicate_experts(wl, num_physical)
    per_replica = (wl / cnt)[phy2m]
    pack, rank = balanced_packing(per_replica, num_gpus)
    slots_per_gpu = num_physical // num_gpus
    out = np.empty(num_physical, dtype=np.int64)
    out[pack * slots_per_gpu + rank] = ids[phy2m]
    return out.reshape(num_gpus, slots_per_gpu)


def group_experts(groups: list[int], group_size: int) -> np.ndarray:
    """Logical expert ids of the given groups, group by group, ascending inside a group."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(g * group_size, (g + 1) * group_size, dtype=np.int64) for g in groups])


def eplb_placement(
    loads: np.ndarray, num_ranks: int, num_nodes: int, num_groups: int, num_redundant: int
) -> np.ndarray:
    """DeepSeek's EPLB placement of one MoE layer: phy2log [P], P = len(loads) + num_redundant.

    Hierarchical when ``num_groups % num_nodes == 0``, otherwise the global policy (one group, one
    node). Raises DSV3Error when P is not a multiple of num_ranks, num_ranks not a multiple of
    num_nodes, or (hierarchical) num_redundant not a multiple of num_nodes.
    """
    w, p, hierarchical = check_placement_args(loads, num_ranks, num_nodes, num_groups, num_redundant)
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    group_size = w.size // groups
    parts = [
        eplb_pack_node(w, group_experts(node, group_size), p // nodes, num_ranks // nodes).ravel()
        for node in eplb_node_groups(w, groups, nodes)
    ]
    return np.concatenate(parts)
