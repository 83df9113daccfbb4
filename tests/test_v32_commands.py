"""DeepSeek-V3.2 through every command (SPEC sec. 10-11): the release's header facts at full scale, the
indexer's linears dequantized bit-exactly and its other tensors copied, int4 ``--int4-scope all`` taking
``wq_b``/``wk`` only, split then merge byte-identical (layer 61 keeps its own indexer), reshard rank files
carrying every indexer tensor whole, torchrun over 2 gloo ranks equal to one process, mtp-bench lossless
and the decode cache counting the indexer keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.inspect import inspect_checkpoint
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.converters.reshard import ReshardOptions, reshard
from dsv3tools.evals.mtp import bench
from dsv3tools.model.api import load_model
from tests.conftest import SPEC_INT4_WEIGHTS, WIDE_OVERRIDES, raw_tensors, run_cli
from tests.test_convert import ref_fp8_dequant, ref_int4_dequant

TESTS = Path(__file__).resolve().parent
INDEXER = ("wq_b", "wk", "weights_proj", "k_norm")
# a top-k far below the 12-token test batch, so that every forward here selects keys (SPEC sec. 11)
SMALL_TOPK = {"index_topk": 4}


def indexer_names(names) -> list[str]:
    return sorted(n for n in names if ".self_attn.indexer." in n)


@pytest.fixture(scope="module")
def v32_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v32c") / "tiny-v32-fp8"
    synthesize(out, preset="tiny", family="v3.2", overrides=SMALL_TOPK)
    return out


def test_full_sparse_matches_the_release_header(tmp_path: Path) -> None:
    """SPEC sec. 10: the V3.2 release's header dump, reproduced from config.json alone."""
    out = tmp_path / "v32-full"
    synthesize(out, preset="full", sparse=True, family="v3.2")
    rep = inspect_checkpoint(out)
    assert (rep["num_tensors"], rep["num_shards"]) == (92_425, 163)
    assert rep["params_total"] == 685_355_329_792
    assert rep["bytes_total"] == 689_471_107_200
    assert rep["problems"] == []
    disk = sum(p.stat().st_blocks * 512 for p in out.iterdir())  # allocated, not apparent, size
    assert disk < 100 * 2**20  # sparse files: the data is holes
    names = Checkpoint(out).weight_map
    per_layer = {n.split(".")[2] for n in indexer_names(names)}
    assert per_layer == {str(x) for x in range(62)}  # every layer 0..61, the MTP layer included
    # the decode cache holds index_head_dim indexer keys per token per layer beside MLA's 576 values
    assert rep["kv_cache_values_per_token_per_layer"] == 512 + 64 + 128
    assert rep["kv_cache_bytes_per_token"] == (512 + 64 + 128) * 61 * 2


def test_fp8_to_bf16_indexer_bit_exact(v32_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    r = run_cli("convert", "--model", v32_fp8, "--to", "bf16", "--out", out)
    assert r.returncode == 0, r.stderr
    src, dst = Checkpoint(v32_fp8), Checkpoint(out)
    src_raw, dst_raw = raw_tensors(v32_fp8), raw_tensors(out)
    checked = 0
    for name in indexer_names(src.weight_map):
        mod = name.split(".")[-2]
        if name.endswith("weight_scale_inv"):
            assert name not in dst_raw
        elif mod in ("wq_b", "wk"):
            assert src.get(name).dtype == torch.float8_e4m3fn
            want = ref_fp8_dequant(src.get(name), src.get(name + "_scale_inv")).to(torch.bfloat16)
            assert torch.equal(dst.get(name).view(torch.int16), want.view(torch.int16)), name
            checked += 1
        else:  # weights_proj bf16, k_norm float32 weight and bias: copied byte for byte
            assert dst_raw[name] == src_raw[name], name
            checked += 1
    assert checked == 5 * 4  # 3 main layers + the MTP layer, five tensors each
    assert src.get("model.layers.0.self_attn.indexer.k_norm.bias").dtype == torch.float32


def test_int4_scope_all_quantizes_indexer_linears_only(v32_fp8: Path, tmp_path: Path) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "int4"
    r = run_cli("convert", "--model", v32_fp8, "--to", "int4", "--int4-scope", "all", "--out", out)
    assert r.returncode == 0, r.stderr
    dst, src_raw, dst_raw = Checkpoint(out), raw_tensors(v32_fp8), raw_tensors(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"] == SPEC_INT4_WEIGHTS
    assert r"re:.*indexer\.weights_proj$" in qc["ignore"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    for layer in range(4):
        pre = f"model.layers.{layer}.self_attn.indexer."
        for mod in ("wq_b", "wk"):
            assert dst.linear_format(pre + mod) == "int4"
            sd = {k: dst.get(f"{pre}{mod}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
            theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            ours = ref_int4_dequant(sd["weight_packed"], sd["weight_scale"])
            assert torch.equal(theirs, ours.to(theirs.dtype)), pre + mod
        for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):
            assert dst_raw[pre + name] == src_raw[pre + name], pre + name
    model = load_model(out, dtype=torch.float32)
    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_split_then_merge_byte_identical(v32_fp8: Path, tmp_path: Path) -> None:
    r = run_cli("split-mtp", "--model", v32_fp8, "--out", tmp_path / "split")
    assert r.returncode == 0, r.stderr
    main, mtp = tmp_path / "split" / "main", tmp_path / "split" / "mtp"
    n = Checkpoint(v32_fp8).config.num_hidden_layers
    mtp_idx = indexer_names(raw_tensors(mtp))
    assert mtp_idx and all(x.startswith(f"model.layers.{n}.") for x in mtp_idx)
    assert len(mtp_idx) == 7  # the MTP layer holds its own indexer: 2 fp8 linears + scales, 3 tensors
    assert not any(x.startswith(f"model.layers.{n}.") for x in raw_tensors(main))
    r = run_cli("merge-mtp", "--main", main, "--mtp", mtp, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert raw_tensors(tmp_path / "merged") == raw_tensors(v32_fp8)
    assert (tmp_path / "merged" / "config.json").read_bytes() == (v32_fp8 / "config.json").read_bytes()


def _skewed_loads(path: Path, cfg) -> str:
    e = cfg.n_routed_experts
    loads = {str(x): [float((i * 5) % 7 + 1) ** 3 for i in range(e)] for x in cfg.moe_layers}
    path.write_text(json.dumps({"layers": loads}))
    return str(path)


@pytest.fixture(scope="module")
def v32_resharded(v32_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v32c") / "ep2"
    cfg = Checkpoint(v32_fp8).config
    opt = ReshardOptions(2, num_redundant=2, expert_load=_skewed_loads(out.parent / "loads.json", cfg))
    reshard(v32_fp8, out, opt)
    return out


def test_reshard_keeps_every_indexer_tensor_whole(v32_fp8: Path, v32_resharded: Path) -> None:
    from safetensors.torch import load_file

    ck = Checkpoint(v32_fp8)
    ranks = []
    for r in range(2):
        d: dict[str, torch.Tensor] = {}
        for f in sorted(v32_resharded.glob(f"rank{r}-*.safetensors")):
            d.update(load_file(f))
        ranks.append(d)
    names = indexer_names(ck.weight_map)
    assert len(names) == 7 * 4
    for name in names:
        orig = ck.get(name)
        for d in ranks:
            got = d[name]
            assert got.dtype == orig.dtype and torch.equal(got.view(torch.uint8), orig.view(torch.uint8)), (
                name
            )


def test_torchrun_two_ranks_equal_one_process(v32_fp8: Path, v32_resharded: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from dist_worker import run as run_checks

    dest = tmp_path / "logits.pt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(TESTS / "dist_worker.py"), str(v32_resharded), str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = torch.load(dest), run_checks(load_model(v32_fp8, dtype=torch.float32))
    assert sorted(got) == sorted(ref) and "mtp" in ref
    for key in ("logits", "decode", "mtp"):
        a, b = ref[key].float(), got[key].float()
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()), key
    assert torch.equal(ref["routing"], got["routing"])


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_bench_lossless(v32_fp8: Path, k: int) -> None:
    import random

    model = load_model(v32_fp8, dtype=torch.float32)
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(5, 261) for _ in range(rng.randint(4, 10))] for _ in range(8)]
    r = bench(model, prompts, 10, k)  # prompt + generated > index_topk: decode selects keys
    assert r["lossless"] and r["prompts"] == 8
    assert len(r["per_position"]) == k


def test_mtp_bench_and_generate_cli(v32_fp8: Path, tmp_path: Path) -> None:
    pf = tmp_path / "p.txt"
    pf.write_text("hello there\nup: a b c d\n")
    r = run_cli("mtp-bench", "--model", v32_fp8, "--prompts", pf, "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lossless"] is True
    r = run_cli("generate", "--model", v32_fp8, "--prompt", "hello there", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr


def test_reshard_deepseek_format_as_v32_convert_py_writes(tmp_path: Path) -> None:
    """`--format deepseek` on V3.2, as DeepSeek's V3.2 inference/convert.py writes it: every indexer tensor
    whole on every rank under its own name (`layers.L.attn.indexer.{wq_b,wk}.{weight,scale}`,
    `k_norm.{weight,bias}` float32, `weights_proj.weight`), byte-equal to the source; the MTP layer dropped;
    config_demo.json with the V3.2 ModelArgs (scale_fmt, index_*)."""
    from safetensors.torch import load_file

    src = tmp_path / "v32-wide"
    synthesize(src, preset="tiny", family="v3.2", overrides={**SMALL_TOPK, **WIDE_OVERRIDES})
    out = tmp_path / "mp2"
    r = run_cli("reshard", "--model", src, "--gpus", "2", "--format", "deepseek", "--out", out)
    assert r.returncode == 0, r.stderr
    ck = Checkpoint(src)
    cfg = ck.config
    ranks = [load_file(out / f"model{k}-mp2.safetensors") for k in range(2)]
    suffixes = {
        "wq_b.weight": "wq_b.weight",
        "wq_b.scale": "wq_b.weight_scale_inv",
        "wk.weight": "wk.weight",
        "wk.scale": "wk.weight_scale_inv",
        "k_norm.weight": "k_norm.weight",
        "k_norm.bias": "k_norm.bias",
        "weights_proj.weight": "weights_proj.weight",
    }
    for d in ranks:
        assert not any(n.startswith(f"layers.{cfg.num_hidden_layers}.") for n in d)  # MTP dropped
        for layer in range(cfg.num_hidden_layers):
            names = {n for n in d if n.startswith(f"layers.{layer}.attn.indexer.")}
            assert names == {f"layers.{layer}.attn.indexer.{s}" for s in suffixes}
            for short, hf in suffixes.items():
                t = d[f"layers.{layer}.attn.indexer.{short}"]
                orig = ck.get(f"model.layers.{layer}.self_attn.indexer.{hf}")
                assert t.dtype == orig.dtype and torch.equal(t.view(torch.uint8), orig.view(torch.uint8)), (
                    short
                )
        assert d["layers.0.attn_norm.weight"].dtype == torch.float32  # V3.2's float32 norms kept
    demo = json.loads((out / "config_demo.json").read_text())
    assert (demo["index_n_heads"], demo["index_head_dim"], demo["index_topk"]) == (
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
    )
    assert (
        demo["scale_fmt"] == "ue8m0" and demo["dtype"] == "fp8" and demo["n_layers"] == cfg.num_hidden_layers
    )
