"""Expert placement (SPEC sec. 6): EPLB baseline, our balanced placement, metrics, load files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv3tools.converters.placement import (
    balanced_placement,
    derive,
    eplb_placement,
    imbalance,
    load_expert_loads,
    plan_placement,
    sglang_expert_location,
    uniform_loads,
)
from dsv3tools.errors import DSV3Error


def _check_layout(phy2log, e, n, nodes, groups, r, hierarchical=True):
    p2l = np.asarray(phy2log)
    assert p2l.shape == (e + r,)
    logcnt, log2phy = derive(p2l, e)
    assert (logcnt >= 1).all() and logcnt.sum() == e + r
    for ex in range(e):  # log2phy lists exactly the slots holding the expert
        slots = [s for s in log2phy[ex] if s >= 0]
        assert sorted(slots) == np.flatnonzero(p2l == ex).tolist()
    if hierarchical and nodes > 1:
        node_of_slot = np.arange(e + r) // ((e + r) // nodes)
        gsize = e // groups
        for g in range(groups):
            mask = (p2l // gsize) == g
            assert len(set(node_of_slot[mask].tolist())) == 1, f"group {g} spans nodes"
        # every node holds the same number of replicas by construction (rank-major, equal slots)


def test_eplb_hand_checked_global():
    # replicate: e0 (10) -> 2 replicas, then e3 (6) -> 2 replicas; per replica [5,1,4,3 | 5,3]
    # pack heaviest first into 2 GPUs x 3 slots: GPU0 = e0, e2, e1 ; GPU1 = e0, e3, e3
    w = np.array([10.0, 1.0, 4.0, 6.0])
    p2l = eplb_placement(w, num_ranks=2, num_nodes=1, num_groups=1, num_redundant=2)
    assert p2l.tolist() == [0, 2, 1, 0, 3, 3]
    assert imbalance(p2l, w, 2) == pytest.approx(11 / 10.5)


def test_eplb_hand_checked_hierarchical():
    # groups (size 2) loads [9, 4, 10, 2]: node0 <- g2, g3 ; node1 <- g0, g1
    w = np.array([8.0, 1.0, 2.0, 2.0, 5.0, 5.0, 1.0, 1.0])
    p2l = eplb_placement(w, num_ranks=4, num_nodes=2, num_groups=4, num_redundant=0)
    assert p2l.tolist() == [4, 6, 5, 7, 0, 1, 2, 3]
    assert imbalance(p2l, w, 4) == pytest.approx(9 / 6.25)
    ours = balanced_placement(w, 4, 2, 4, 0)
    assert imbalance(ours, w, 4) == pytest.approx(9 / 6.25)  # 8 + lightest partner is optimal
    _check_layout(ours, 8, 4, 2, 4, 0)


def test_ours_improves_hand_case():
    # EPLB: GPU loads 10 / 11; moving e3's extra replica to e0 allows 10.33 / 10.67
    w = np.array([10.0, 1.0, 4.0, 6.0])
    ours = balanced_placement(w, 2, 1, 1, 2)
    assert imbalance(ours, w, 2) < 11 / 10.5 - 1e-9
    _check_layout(ours, 4, 2, 1, 1, 2, hierarchical=False)


@pytest.mark.parametrize(
    "n,nodes,r",
    [(8, 1, 0), (8, 1, 8), (8, 2, 8), (16, 2, 16), (16, 4, 0), (32, 4, 32), (64, 8, 64), (64, 2, 0)],
)
def test_consistency_and_never_worse(n, nodes, r):
    rng = np.random.default_rng(1000 + n + nodes + r)
    for sigma in (0.5, 1.0):
        for _ in range(3):
            w = rng.lognormal(0.0, sigma, 256)
            a = eplb_placement(w, n, nodes, 8, r)
            b = balanced_placement(w, n, nodes, 8, r)
            _check_layout(a, 256, n, nodes, 8, r)
            _check_layout(b, 256, n, nodes, 8, r)
            assert imbalance(b, w, n) <= imbalance(a, w, n) + 1e-12


def test_ours_reduces_excess_on_average():
    rng = np.random.default_rng(7)
    ratios = []
    for n in (16, 32, 64):
        for r in (0, n):
            w = rng.lognormal(0.0, 0.5, 256)
            ea = imbalance(eplb_placement(w, n, 1, 8, r), w, n) - 1
            eb = imbalance(balanced_placement(w, n, 1, 8, r), w, n) - 1
            if ea > 1e-3:
                ratios.append(eb / ea)
    assert ratios and float(np.mean(ratios)) < 0.9


def test_global_policy_when_nodes_do_not_divide_groups():
    rng = np.random.default_rng(3)
    w = rng.lognormal(0.0, 1.0, 24)
    # 3 nodes do not divide 8 groups -> global policy; R need not be a multiple of nodes
    for fn in (eplb_placement, balanced_placement):
        p2l = fn(w, 6, 3, 8, 6)
        _check_layout(p2l, 24, 6, 3, 8, 6, hierarchical=False)
    assert imbalance(balanced_placement(w, 6, 3, 8, 6), w, 6) <= imbalance(
        eplb_placement(w, 6, 3, 8, 6), w, 6
    )


def test_imbalance_matches_straightforward_computation():
    rng = np.random.default_rng(5)
    w = rng.lognormal(0.0, 1.0, 16)
    p2l = balanced_placement(w, 4, 1, 1, 4)
    counts = {e: 0 for e in range(16)}
    for e in p2l.tolist():
        counts[e] += 1
    per_rank = []
    for rank in range(4):
        total = 0.0
        for slot in range(rank * 5, rank * 5 + 5):
            total += w[p2l[slot]] / counts[p2l[slot]]
        per_rank.append(total)
    assert imbalance(p2l, w, 4) == pytest.approx(max(per_rank) / (sum(per_rank) / 4), rel=1e-12)
    assert imbalance(p2l, np.zeros(16), 4) == 1.0


def test_derive_padding():
    logcnt, log2phy = derive(np.array([2, 0, 1, 2, 3, 2]), 4)
    assert logcnt.tolist() == [1, 1, 3, 1]
    assert log2phy.tolist() == [[1, -1, -1], [2, -1, -1], [0, 3, 5], [4, -1, -1]]


@pytest.mark.parametrize(
    "args,fragment",
    [
        ((8, 1, 8, 3), "multiple of --gpus 8"),  # 259 % 8
        ((6, 4, 8, 0), "multiple of --nodes 4"),  # gpus % nodes
        ((8, 1, 7, 0), "equal expert groups"),  # 256 % 7
    ],
)
def test_divisibility_errors(args, fragment):
    w = np.ones(256)
    for fn in (eplb_placement, balanced_placement):
        with pytest.raises(DSV3Error, match=fragment):
            fn(w, *args)


def test_bad_loads_rejected():
    with pytest.raises(DSV3Error):
        eplb_placement(np.array([1.0, -1.0]), 1, 1, 1, 0)
    with pytest.raises(DSV3Error):
        eplb_placement(np.ones((2, 2)), 1, 1, 1, 0)


def test_plan_placement_object():
    rng = np.random.default_rng(11)
    loads = {3: rng.lognormal(0, 1, 256), 4: rng.lognormal(0, 1, 256)}
    plan = plan_placement(loads, 16, 2, 8, 16, policy="ours")
    assert plan["num_ranks"] == 16 and plan["num_nodes"] == 2
    assert plan["num_physical"] == 272 and plan["num_logical"] == 256 and plan["policy"] == "ours"
    assert set(plan["layers"]) == {"3", "4"}
    for lid, layer in plan["layers"].items():
        assert len(layer["phy2log"]) == 272
        assert layer["imbalance"] <= layer["imbalance_eplb"]
        assert layer["imbalance"] == pytest.approx(
            imbalance(np.array(layer["phy2log"]), loads[int(lid)], 16), abs=1e-6
        )
    json.dumps(plan)
    base = plan_placement(loads, 16, 2, 8, 16, policy="eplb")
    assert base["layers"]["3"]["phy2log"] == eplb_placement(loads[3], 16, 2, 8, 16).tolist()
    with pytest.raises(DSV3Error):
        plan_placement(loads, 16, 2, 8, 16, policy="best")


# ----------------------------------------------------------------------------- load files
# model: layers 0..3 main (0, 1 dense), MoE ids 2, 3 and MTP layer 4; 8 experts
IDS, E, NH = [2, 3, 4], 8, 4


def test_load_our_json_with_missing_mtp(tmp_path):
    f = tmp_path / "load.json"
    f.write_text(json.dumps({"layers": {"2": list(range(8)), "3": [1] * 8}}))
    out = load_expert_loads(f, IDS, E, num_hidden_layers=NH)
    assert out[2].tolist() == list(range(8)) and out[3].tolist() == [1] * 8
    assert out[4].tolist() == [1.0] * 8  # uniform fallback
    f.write_text(json.dumps({"layers": {"2": [1] * 7}}))
    with pytest.raises(DSV3Error, match="load.json"):
        load_expert_loads(f, IDS, E, num_hidden_layers=NH)
    f.write_text(json.dumps({"layers": {"9": [1] * 8}}))
    with pytest.raises(DSV3Error, match="MoE layer"):
        load_expert_loads(f, IDS, E, num_hidden_layers=NH)


def test_load_sglang_dump_pt_and_json(tmp_path):
    counts = torch.arange(2 * NH * E, dtype=torch.int64).reshape(2, NH, E)
    expected = counts.sum(0).double().numpy()
    pt = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, pt)
    js = tmp_path / "dump.json"
    js.write_text(json.dumps({"logical_count": counts.tolist()}))
    for f in (pt, js):
        out = load_expert_loads(f, IDS, E, num_hidden_layers=NH)
        assert out[2].tolist() == expected[2].tolist() and out[3].tolist() == expected[3].tolist()
        assert out[4].tolist() == [1.0] * 8
    torch.save({"logical_count": torch.zeros(2, NH, E + 1)}, pt)
    with pytest.raises(DSV3Error, match=r"expert_distribution_recorder_1\.pt.*\[2, 4, 9\]"):
        load_expert_loads(pt, IDS, E, num_hidden_layers=NH)


def test_load_tables_all_forms(tmp_path):
    main_rows = np.arange(2 * E, dtype=np.float64).reshape(2, E)  # vLLM style: MoE layers 2, 3
    out = load_expert_loads(_save_npy(tmp_path, main_rows), IDS, E, num_hidden_layers=NH)
    assert out[2].tolist() == main_rows[0].tolist() and out[3].tolist() == main_rows[1].tolist()
    assert out[4].tolist() == [1.0] * 8
    all_rows = np.arange(3 * E, dtype=np.float64).reshape(3, E)  # MoE layers incl. MTP
    out = load_expert_loads(_save_npy(tmp_path, all_rows), IDS, E, num_hidden_layers=NH)
    assert out[4].tolist() == all_rows[2].tolist()
    by_id = np.arange(NH * E, dtype=np.float64).reshape(NH, E)  # rows = layer ids
    pt = tmp_path / "table.pt"
    torch.save(torch.from_numpy(by_id), pt)
    out = load_expert_loads(pt, IDS, E, num_hidden_layers=NH)
    assert out[2].tolist() == by_id[2].tolist() and out[3].tolist() == by_id[3].tolist()
    js = tmp_path / "table.json"
    js.write_text(json.dumps(by_id.tolist()))
    assert load_expert_loads(js, IDS, E, num_hidden_layers=NH)[3].tolist() == by_id[3].tolist()


def test_load_table_wrong_shape(tmp_path):
    f = _save_npy(tmp_path, np.ones((7, E)))
    with pytest.raises(DSV3Error) as info:
        load_expert_loads(f, IDS, E, num_hidden_layers=NH)
    msg = str(info.value)
    assert "table.npy" in msg and "[7, 8]" in msg and "[2, 8]" in msg and "[4, 8]" in msg
    with pytest.raises(DSV3Error, match="not found"):
        load_expert_loads(tmp_path / "missing.json", IDS, E)
    with pytest.raises(DSV3Error, match="unknown expert-load file type"):
        (tmp_path / "x.csv").write_text("1,2")
        load_expert_loads(tmp_path / "x.csv", IDS, E)


def _save_npy(tmp_path, arr):
    f = tmp_path / "table.npy"
    np.save(f, arr)
    return f


def test_uniform_and_sglang_expert_location():
    loads = uniform_loads([3, 4, 61], 256)
    assert set(loads) == {3, 4, 61} and all(v.tolist() == [1.0] * 256 for v in loads.values())
    rng = np.random.default_rng(2)
    plan = plan_placement(
        {3: rng.lognormal(0, 1, 256), 4: rng.lognormal(0, 1, 256), 61: np.ones(256)}, 8, 1, 8, 8
    )
    loc = sglang_expert_location(plan, num_hidden_layers=61)
    assert list(loc) == ["physical_to_logical_map"]
    table = loc["physical_to_logical_map"]
    assert len(table) == 61 and all(len(row) == 264 for row in table)
    assert table[0] == [i % 256 for i in range(264)]  # dense layer: SGLang's trivial map
    assert table[3] == plan["layers"]["3"]["phy2log"] and table[4] == plan["layers"]["4"]["phy2log"]
    json.dumps(loc)
