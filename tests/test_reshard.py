"""reshard (SPEC sec. 6): rank files reproduce every source tensor, placement.json is consistent, the
DeepSeek demo format has the demo's names/dtypes/shapes, dry-run on the full layout, bad input -> exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dsv3tools.checkpoint import synth
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.cli import main
from dsv3tools.converters.reshard_deepseek import demo_name, hf_name

# independent table (SPEC sec. 6): module suffix -> split dim; everything else whole except experts
SPLIT_DIMS = {
    "q_b_proj": 0,
    "kv_b_proj": 0,
    "o_proj": 1,
    "gate_proj": 0,
    "up_proj": 0,
    "down_proj": 1,
    "embed_tokens": 0,
    "lm_head": 0,
    "head": 0,
}
EXPERT_BYTES_FULL = 44_050_944  # SPEC sec. 3: one routed expert per layer, FP8 with scales
FULL_BYTES = 688_574_839_360


@pytest.fixture
def run(capsys):
    """The CLI in-process: (exit code, stdout, stderr)."""

    def _run(*args):
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    return _run


def _load_ranks(out: Path, n: int, prefix: str = "rank") -> list[dict[str, torch.Tensor]]:
    ranks = []
    for r in range(n):
        files = sorted(out.glob(f"{prefix}{r}-*.safetensors"))
        assert files, f"no files for rank {r}"
        d: dict[str, torch.Tensor] = {}
        for f in files:
            d.update(load_file(f))
        ranks.append(d)
    return ranks


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "weight_scale_inv", "scale") else parts[-1]


def _check_reassembly(src: Path, out: Path, n: int, placement: dict, keep_mtp: bool = True) -> None:
    ck = Checkpoint(src)
    cfg = ck.config
    ranks = _load_ranks(out, n)
    unsplit = set(json.loads((out / "reshard.json").read_text()).get("unsplit", []))
    slot_re = re.compile(r"^model\.layers\.(\d+)\.mlp\.slots\.(\d+)\.(.+)$")
    seen: set[str] = set()
    for r, d in enumerate(ranks):
        per_layer: dict[int, set[int]] = {}
        for name, t in d.items():
            m = slot_re.match(name)
            if m:
                layer, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
                p2l = placement["layers"][str(layer)]["phy2log"]
                per = len(p2l) // n
                assert r * per <= slot < (r + 1) * per, f"slot {slot} on rank {r}"
                orig = f"model.layers.{layer}.mlp.experts.{p2l[slot]}.{rest}"
                assert _same(t, ck.get(orig)), name
                seen.add(orig)
                per_layer.setdefault(layer, set()).add(slot)
        for layer, slots in per_layer.items():  # every rank holds exactly P/N slots of each MoE layer
            assert len(slots) == len(placement["layers"][str(layer)]["phy2log"]) // n
    for name in ck.weight_map:
        lid = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if ".mlp.experts." in name or (not keep_mtp and lid is not None and lid >= cfg.num_hidden_layers):
            continue
        orig = ck.get(name)
        parts = [d[name] for d in ranks]
        dim = SPLIT_DIMS.get(_module(name))
        if dim is None or n == 1 or ".mlp.gate." in name or name.rsplit(".", 1)[0] in unsplit:
            assert all(_same(p, orig) for p in parts), name
        else:
            assert all(p.shape[dim] * n == orig.shape[dim] for p in parts), name
            assert _same(torch.cat(parts, dim), orig), name
        seen.add(name)
    expected = (
        set(ck.weight_map)
        if keep_mtp
        else {k for k in ck.weight_map if not k.startswith(f"model.layers.{cfg.num_hidden_layers}.")}
    )
    assert seen == expected  # every source tensor is somewhere, every expert in some slot


def _check_placement(out: Path, n: int, e: int, r: int, cfg) -> dict:
    pl = json.loads((out / "placement.json").read_text())
    assert (pl["num_ranks"], pl["num_physical"]) == (n, e + r)
    assert sorted(pl["layers"]) == sorted(str(x) for x in cfg.moe_layers)
    for v in pl["layers"].values():
        cnt = np.bincount(v["phy2log"], minlength=e)
        assert len(v["phy2log"]) == e + r and (cnt >= 1).all() and len(cnt) == e
        assert v["imbalance"] >= 1.0 - 1e-9
    sg = json.loads((out / "sglang_expert_location.json").read_text())
    table = sg["physical_to_logical_map"]
    assert len(table) == cfg.num_hidden_layers and all(len(row) == e + r for row in table)
    for lid in cfg.moe_layers:
        if lid < cfg.num_hidden_layers:
            assert table[lid] == pl["layers"][str(lid)]["phy2log"]
    return pl


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("redundant", [0, 4])
@pytest.mark.parametrize("which", ["bf16", "fp8"])
def test_rank_files_reproduce_every_tensor(n, redundant, which, tiny_bf16, tiny_wide_fp8, tmp_path, run):
    src = tiny_bf16 if which == "bf16" else tiny_wide_fp8
    out = tmp_path / "ep"
    loads = tmp_path / "loads.json"  # skewed loads so that replicas go to the hot experts
    ck = Checkpoint(src)
    e = ck.config.n_routed_experts
    loads.write_text(
        json.dumps(
            {
                "layers": {
                    str(x): [float((i * 7919) % 13 + 1) ** 2 for i in range(e)] for x in ck.config.moe_layers
                }
            }
        )
    )
    args = (
        "reshard",
        "--model",
        src,
        "--gpus",
        n,
        "--redundant-experts",
        redundant,
        "--expert-load",
        loads,
        "--out",
        out,
        "--json",
    )
    code, stdout, err = run(*args)
    assert code == 0, err
    res = json.loads(stdout)
    pl = _check_placement(out, n, e, redundant, ck.config)
    assert res["placement"]["layers"] == pl["layers"]
    _check_reassembly(src, out, n, pl)
    sizes = [sum(f.stat().st_size for f in out.glob(f"rank{k}-*.safetensors")) for k in range(n)]
    assert all(abs(s - b) < 10**5 for s, b in zip(sizes, res["bytes_per_rank"], strict=True))  # + headers
    for v in pl["layers"].values():
        assert v["imbalance"] <= v["imbalance_eplb"] + 1e-9
    if redundant:
        assert any(len(set(v["phy2log"])) < len(v["phy2log"]) for v in pl["layers"].values())
    code, stdout, _ = run(*args)  # resume: nothing left to write
    assert code == 0 and json.loads(stdout)["written"] == []


def test_fp8_blocks_that_cannot_split_stay_whole(tiny_fp8, tmp_path, run):
    """Tiny FP8 at N=2: q_b_proj (384 rows = 3 blocks) and the shared expert (128 = 1 block) cannot be cut
    on block boundaries; they are whole on every rank, everything else is split."""
    out = tmp_path / "ep"
    code, stdout, err = run(
        "reshard", "--model", tiny_fp8, "--gpus", 2, "--redundant-experts", 2, "--out", out, "--json"
    )
    assert code == 0, err
    cfg = Checkpoint(tiny_fp8).config
    want = [f"model.layers.{i}.self_attn.q_b_proj" for i in cfg.all_layers]
    want += [
        f"model.layers.{i}.mlp.shared_experts.{p}"
        for i in cfg.moe_layers
        for p in ("down_proj", "gate_proj", "up_proj")
    ]
    assert json.loads(stdout)["unsplit"] == sorted(want)
    _check_reassembly(tiny_fp8, out, 2, json.loads((out / "placement.json").read_text()))
    r0 = load_file(next(out.glob("rank0-*.safetensors")))
    assert r0["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape == (2, 1)  # split: 4 blocks / 2


def test_no_mtp_drops_layer_and_placement(tiny_bf16, tmp_path, cli):
    out = tmp_path / "ep"  # through the real console entry (subprocess): exit code and JSON on stdout
    r = cli("reshard", "--model", tiny_bf16, "--gpus", 2, "--no-mtp", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dropped_bytes"] > 0
    pl = json.loads((out / "placement.json").read_text())
    cfg = Checkpoint(tiny_bf16).config
    assert sorted(pl["layers"]) == [str(x) for x in cfg.moe_layers if x < cfg.num_hidden_layers]
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    _check_reassembly(tiny_bf16, out, 2, pl, keep_mtp=False)


def _demo_expected(cfg, n: int, fp8: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names/dtypes/shapes DeepSeek's demo (convert.py + model.py) expects on each rank, built by hand."""
    h, nh, v = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    qh, kvh = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
    w8 = torch.float8_e4m3fn if fp8 else torch.bfloat16
    exp: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "embed.weight": (torch.bfloat16, (v // n, h)),
        "head.weight": (torch.bfloat16, (v // n, h)),
        "norm.weight": (torch.bfloat16, (h,)),
    }

    def lin(name, out, inp):
        exp[f"{name}.weight"] = (w8, (out, inp))
        if fp8:
            exp[f"{name}.scale"] = (torch.float32, (-(-out // 128), -(-inp // 128)))

    for lid in range(cfg.num_hidden_layers):
        p = f"layers.{lid}"
        lin(f"{p}.attn.wq_a", cfg.q_lora_rank, h)
        lin(f"{p}.attn.wq_b", nh * qh // n, cfg.q_lora_rank)
        lin(f"{p}.attn.wkv_a", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        lin(f"{p}.attn.wkv_b", nh * kvh // n, cfg.kv_lora_rank)
        lin(f"{p}.attn.wo", h, nh * cfg.v_head_dim // n)
        for nm, d in (
            ("attn_norm", h),
            ("ffn_norm", h),
            ("attn.q_norm", cfg.q_lora_rank),
            ("attn.kv_norm", cfg.kv_lora_rank),
        ):
            exp[f"{p}.{nm}.weight"] = (torch.bfloat16, (d,))
        if lid < cfg.first_k_dense_replace:
            mlps = [(f"{p}.ffn", cfg.intermediate_size // n)]
        else:
            exp[f"{p}.ffn.gate.weight"] = (torch.bfloat16, (cfg.n_routed_experts, h))
            exp[f"{p}.ffn.gate.bias"] = (torch.float32, (cfg.n_routed_experts,))
            mlps = [(f"{p}.ffn.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts // n)]
            mlps += [(f"{p}.ffn.experts.{{e}}", cfg.moe_intermediate_size)]
        for pre, inter in mlps:
            lin(f"{pre}.w1", inter, h)
            lin(f"{pre}.w3", inter, h)
            lin(f"{pre}.w2", h, inter)
    return exp


@pytest.mark.parametrize("n", [2, 4])
def test_deepseek_format(n, tiny_wide_fp8, tmp_path, run):
    out = tmp_path / "mp"
    code, _, err = run(
        "reshard", "--model", tiny_wide_fp8, "--gpus", n, "--format", "deepseek", "--out", out, "--json"
    )
    assert code == 0, err
    ck = Checkpoint(tiny_wide_fp8)
    cfg = ck.config
    exp = _demo_expected(cfg, n, fp8=True)
    per = cfg.n_routed_experts // n
    ranks = [load_file(out / f"model{k}-mp{n}.safetensors") for k in range(n)]
    for k, d in enumerate(ranks):
        want = {}
        for name, spec in exp.items():
            for e in range(k * per, (k + 1) * per) if "{e}" in name else [None]:
                want[name.format(e=e) if e is not None else name] = spec
        assert {nm: (t.dtype, tuple(t.shape)) for nm, t in d.items()} == want
    # re-assemble: demo names back to HF names, concat split tensors, collect experts
    demo_to_hf = {
        "embed": "embed_tokens",
        "head": "lm_head",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "wq_a": "q_a_proj",
        "q_norm": "q_a_layernorm",
        "wq_b": "q_b_proj",
        "wkv_a": "kv_a_proj_with_mqa",
        "kv_norm": "kv_a_layernorm",
        "wkv_b": "kv_b_proj",
        "wo": "o_proj",
        "w1": "gate_proj",
        "w2": "down_proj",
        "w3": "up_proj",
    }
    for name in ranks[0].keys() | ranks[-1].keys():
        parts = name.split(".")
        parts[-2] = demo_to_hf.get(parts[-2], parts[-2])
        parts[-1] = {"scale": "weight_scale_inv", "bias": "e_score_correction_bias"}.get(parts[-1], parts[-1])
        hf = ".".join(parts).replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
        hf = hf if hf.startswith("lm_head") else "model." + hf
        orig = ck.get(hf)
        have = [d[name] for d in ranks if name in d]
        dim = SPLIT_DIMS.get(_module(hf))
        if ".experts." in hf and ".shared_experts." not in hf:
            assert len(have) == 1 and _same(have[0], orig), name
        elif dim is None or ".mlp.gate." in hf:
            assert len(have) == n and all(_same(t, orig) for t in have), name
        else:
            assert _same(torch.cat(have, dim), orig), name
    assert all(hf_name(demo_name(k)) == k for k in ck.weight_map if not k.startswith("model.layers.3."))
    demo = json.loads((out / "config_demo.json").read_text())
    assert (demo["n_heads"], demo["dim"], demo["n_routed_experts"]) == (16, 256, 16)


def test_dry_run_full_sparse(tmp_path, run):
    src = tmp_path / "full"
    synth.synthesize(src, preset="full", sparse=True)
    ck = Checkpoint(src)
    infos = ck.infos()
    assert sum(i.nbytes for i in infos.values()) == FULL_BYTES
    whole_re = re.compile(r"(q_a_proj|kv_a_proj_with_mqa|layernorm|norm|mlp\.gate|eh_proj)\.")
    whole = sum(
        i.nbytes for k, i in infos.items() if whole_re.search(k) or k.endswith("e_score_correction_bias")
    )
    layer61 = sum(i.nbytes for k, i in infos.items() if k.startswith("model.layers.61."))
    out = tmp_path / "never"
    for extra, redundant, moe_layers, drop in (([], 16, 59, 0), (["--no-mtp"], 32, 58, layer61)):
        code, stdout, err = run(
            "reshard",
            "--model",
            src,
            "--gpus",
            16,
            "--redundant-experts",
            redundant,
            "--dry-run",
            "--json",
            "--out",
            out,
            *extra,
        )
        assert code == 0, err
        res = json.loads(stdout)
        whole_here = whole - (
            sum(
                i.nbytes
                for k, i in infos.items()
                if k.startswith("model.layers.61.") and (whole_re.search(k) or k.endswith("bias"))
            )
            if drop
            else 0
        )
        want = FULL_BYTES - drop + redundant * moe_layers * EXPERT_BYTES_FULL + 15 * whole_here
        assert res["total_bytes"] == sum(res["bytes_per_rank"]) == want
        assert len(set(res["bytes_per_rank"])) == 1 and len(res["bytes_per_rank"]) == 16
        assert res["replica_bytes"] == redundant * moe_layers * EXPERT_BYTES_FULL
        assert len(res["placement"]["layers"]) == moe_layers
        assert res["placement"]["num_physical"] == 256 + redundant
    assert not out.exists()


@pytest.mark.parametrize(
    "args, rule",
    [
        (["--gpus", "3"], "not a multiple of --gpus 3"),
        (["--gpus", "6", "--nodes", "3", "--redundant-experts", "2"], "must divide the 4 expert groups"),
        (["--gpus", "2", "--format", "deepseek", "--redundant-experts", "2"], "no redundant experts"),
        (["--gpus", "2", "--expert-load", "LOADS"], "expected [16]"),
        (["--gpus", "3", "--format", "deepseek"], "16 experts are not divisible by --gpus 3"),
    ],
)
def test_bad_input_exits_2(args, rule, tiny_bf16, tmp_path, run):
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"layers": {"1": [1.0, 2.0, 3.0]}}))
    args = [str(loads) if a == "LOADS" else a for a in args]
    code, _, err = run("reshard", "--model", tiny_bf16, "--out", tmp_path / "o", *args)
    assert code == 2, err
    assert rule in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_fp8_split_that_cuts_a_block_is_refused(tiny_fp8, tmp_path, cli):
    r = cli("reshard", "--model", tiny_fp8, "--gpus", 2, "--format", "deepseek", "--out", tmp_path / "o")
    assert r.returncode == 2  # subprocess: the real exit code, one line, no traceback
    assert "q_b_proj" in r.stderr and "block" in r.stderr and "Traceback" not in r.stderr


def test_expert_load_feeds_reshard(tiny_bf16, tmp_path, run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Hello world, this is a prompt.\n\nThe quick brown fox jumps over the lazy dog.\nabc\n"
    )
    out = tmp_path / "load.json"
    code, stdout, err = run("expert-load", "--model", tiny_bf16, "--prompts", prompts, "--out", out, "--json")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res == {k: v for k, v in json.loads(stdout).items() if k != "out"}
    cfg = Checkpoint(tiny_bf16).config
    k = cfg.num_experts_per_tok
    tokens = [
        1 + len(line.encode()) for line in prompts.read_text().splitlines() if line
    ]  # BOS + byte tokens
    assert res["prompts"] == 3 and res["tokens"] == sum(tokens)
    assert sorted(res["layers"]) == sorted(str(x) for x in cfg.moe_layers)
    for lid, row in res["layers"].items():
        assert len(row) == cfg.n_routed_experts and min(row) >= 0
        # main layers see every token; the MTP layer every token but the last of each prompt
        want = sum(tokens) * k if int(lid) < cfg.num_hidden_layers else (sum(tokens) - 3) * k
        assert sum(row) == want
    code, stdout, err = run(
        "reshard",
        "--model",
        tiny_bf16,
        "--gpus",
        4,
        "--redundant-experts",
        4,
        "--expert-load",
        out,
        "--dry-run",
        "--json",
    )
    assert code == 0, err
    for v in json.loads(stdout)["placement"]["layers"].values():
        assert 1.0 <= v["imbalance"] <= v["imbalance_eplb"] + 1e-9
    code, _, err = run("expert-load", "--model", tiny_bf16, "--prompts", tmp_path / "nope.txt")
    assert code == 2 and "prompts file not found" in err
