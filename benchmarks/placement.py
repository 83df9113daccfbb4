"""Expert placement benchmark: imbalance of our placement vs DeepSeek's EPLB greedy (SPEC sec. 6).

Run by hand:  python benchmarks/placement.py [--layers 8] [--seed 0] [--expert-load FILE] [--family kimi-k2] [--json]

For 256 experts in 8 groups (``--family kimi-k2``: 384 experts in 1 group, so 1 node: the global policy), skewed loads (log-normal sigma 0.5 and 1.0, a few hot experts, and
optionally the layers of an expert-load file), GPUs in {8,16,32,64}, nodes in {1,2,4,8} and
redundant experts in {0, N}: mean imbalance (max rank load / mean rank load) of EPLB and ours over
the layers, then a summary: cases where ours is worse (must be 0), whether every expert group stays
on one node, and the mean of ours_excess / eplb_excess (excess = imbalance - 1) for nodes in {1,2}
where EPLB's excess > 0.001. Also the time to place 58 MoE layers over 64 GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dsv3tools.converters.placement import balanced_placement, eplb_placement, imbalance, load_expert_loads

GPUS = (8, 16, 32, 64)
# member -> (routed experts, expert groups, node counts, MoE layer ids, hidden layers), from its config.json
SHAPES = {
    "v3": (256, 8, (1, 2, 4, 8), list(range(3, 61)), 61),
    "kimi-k2": (384, 1, (1,), list(range(1, 61)), 61),
}
EXPERTS, GROUPS, NODES, MOE_LAYERS, HIDDEN_LAYERS = SHAPES["v3"]


def use_shape(family: str) -> None:
    """Switch the benchmark's expert shape (module state of this script only)."""
    global EXPERTS, GROUPS, NODES, MOE_LAYERS, HIDDEN_LAYERS
    EXPERTS, GROUPS, NODES, MOE_LAYERS, HIDDEN_LAYERS = SHAPES[family]


def distributions(num_layers: int, seed: int, expert_load: str | None) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {
        "lognormal-0.5": [rng.lognormal(0.0, 0.5, EXPERTS) for _ in range(num_layers)],
        "lognormal-1.0": [rng.lognormal(0.0, 1.0, EXPERTS) for _ in range(num_layers)],
    }
    hot = []
    for _ in range(num_layers):
        w = rng.lognormal(0.0, 0.25, EXPERTS)
        idx = rng.choice(EXPERTS, size=6, replace=False)
        w[idx] *= rng.uniform(6.0, 12.0, size=6)
        hot.append(w)
    out["few-hot"] = hot
    if expert_load:
        loads = load_expert_loads(expert_load, MOE_LAYERS, EXPERTS, num_hidden_layers=HIDDEN_LAYERS)
        rows = [v for v in loads.values() if v.sum() > 0 and np.ptp(v) > 0]
        if rows:
            out[f"file:{Path(expert_load).name}"] = rows
    return out


def groups_on_one_node(phy2log: np.ndarray, nodes: int) -> bool:
    node_of_slot = np.arange(phy2log.size) // (phy2log.size // nodes)
    group = phy2log // (EXPERTS // GROUPS)
    return all(len(set(node_of_slot[group == g].tolist())) == 1 for g in range(GROUPS))


def run(num_layers: int, seed: int, expert_load: str | None) -> dict:
    rows, skipped = [], []
    worse = total = 0
    group_ok = True
    for name, layers in distributions(num_layers, seed, expert_load).items():
        for n in GPUS:
            for nodes in NODES:
                for r in (0, n):
                    if (EXPERTS + r) % n or r % nodes or n % nodes:
                        skipped.append(
                            f"{name} gpus={n} nodes={nodes} R={r}: ({EXPERTS}+R)%N or R%nodes != 0"
                        )
                        continue
                    ea, eb, t_ours = [], [], 0.0
                    for w in layers:
                        a = eplb_placement(w, n, nodes, GROUPS, r)
                        t0 = time.perf_counter()
                        b = balanced_placement(w, n, nodes, GROUPS, r)
                        t_ours += time.perf_counter() - t0
                        ia, ib = imbalance(a, w, n), imbalance(b, w, n)
                        worse += ib > ia + 1e-12
                        total += 1
                        if nodes > 1:
                            group_ok &= groups_on_one_node(b, nodes)
                        ea.append(ia - 1)
                        eb.append(ib - 1)
                    rows.append(
                        {
                            "dist": name,
                            "gpus": n,
                            "nodes": nodes,
                            "redundant": r,
                            "eplb": 1 + float(np.mean(ea)),
                            "ours": 1 + float(np.mean(eb)),
                            "excess_ratio": float(np.mean(eb) / np.mean(ea)) if np.mean(ea) > 1e-3 else None,
                            "ms_per_layer": 1000 * t_ours / len(layers),
                        }
                    )
    sel = [x["excess_ratio"] for x in rows if x["nodes"] in (1, 2) and x["excess_ratio"] is not None]
    # speed: 58 MoE layers over 64 GPUs, 2 nodes, 64 redundant experts
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    nodes = 2 if 2 in NODES else 1
    for _ in range(58):
        balanced_placement(rng.lognormal(0.0, 1.0, EXPERTS), 64, nodes, GROUPS, 64)
    t58 = time.perf_counter() - t0
    return {
        "rows": rows,
        "skipped": skipped,
        "summary": {
            "layer_cases": total,
            "ours_worse": int(worse),
            "groups_on_one_node": bool(group_ok),
            "mean_excess_ratio_nodes_1_2": float(np.mean(sel)) if sel else None,
            "cases_in_ratio": len(sel),
            "seconds_58_layers_64_gpus": round(t58, 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="random layers per distribution (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert-load", default=None, help="expert-load file (ours, SGLang dump or table)")
    ap.add_argument("--family", choices=sorted(SHAPES), default="v3", help="expert shape (default v3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    use_shape(args.family)
    res = run(args.layers, args.seed, args.expert_load)
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{'distribution':<16} {'gpus':>4} {'nodes':>5} {'R':>3} {'eplb':>8} {'ours':>8} {'excess ratio':>12} {'ms/layer':>8}"
    )
    for x in res["rows"]:
        ratio = "-" if x["excess_ratio"] is None else f"{x['excess_ratio']:.3f}"
        print(
            f"{x['dist']:<16} {x['gpus']:>4} {x['nodes']:>5} {x['redundant']:>3} {x['eplb']:>8.4f} "
            f"{x['ours']:>8.4f} {ratio:>12} {x['ms_per_layer']:>8.1f}"
        )
    for note in res["skipped"]:
        print(f"skipped: {note}")
    s = res["summary"]
    print(f"ours worse than EPLB: {s['ours_worse']} of {s['layer_cases']} layer cases")
    print(f"every expert group on one node (nodes > 1): {s['groups_on_one_node']}")
    ratio = s["mean_excess_ratio_nodes_1_2"]
    print(
        f"mean ours_excess / eplb_excess, nodes in {{1,2}}, eplb excess > 0.001: "
        f"{'-' if ratio is None else f'{ratio:.3f}'} over {s['cases_in_ratio']} cases"
    )
    print(
        f"time, 58 layers x {EXPERTS} experts over 64 GPUs ({2 if 2 in NODES else 1} node(s), R=64): "
        f"{s['seconds_58_layers_64_gpus']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
