"""The DeepSeek-V3 family (SPEC sec. 10) beyond V3 and V3.2: DeepSeek-V3.1, Kimi-K2, Kimi-K2-Thinking and
Moonlight, each on its own tiny preset, against independent references: transformers' DeepseekV3ForCausalLM
on the same weights, its meta-device parameter count at full scale, compressed-tensors' int4 decompressor,
and tiktoken's own encoder."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.layout import model_weights
from dsv3tools.checkpoint.presets import preset_config
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.config import ModelConfig
from dsv3tools.converters.convert import ConvertOptions, convert
from dsv3tools.model.api import load_model
from tests.conftest import run_cli
from tests.test_convert import ref_fp8_dequant, ref_int4_dequant

MEMBERS = ("v3.1", "kimi-k2", "kimi-k2-thinking", "moonlight")
SEQ = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """member -> (tiny checkpoint as the release stores it, its ``convert --to bf16``)."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for m in MEMBERS:
        src, bf16 = root / m, root / f"{m}-bf16"
        synthesize(src, preset="tiny", family=m)
        convert(src, bf16, ConvertOptions("bf16"))
        out[m] = (src, bf16)
    return out


def _hf_reference(bf16: Path, work: Path, src: Path):
    """transformers' DeepseekV3ForCausalLM on the bf16 conversion (model_type set to deepseek_v3); for an
    int4 source its routed experts get the float32 dequantization (q * scale, unrounded) instead."""
    from transformers import DeepseekV3ForCausalLM

    hf = work / "hf"
    shutil.copytree(bf16, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, model_type="deepseek_v3")))
    model = DeepseekV3ForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    ck = Checkpoint(src)
    if ck.config.quant.method != "int4":
        return model
    for layer in ck.config.moe_layers:
        experts = model.model.layers[layer].mlp.experts
        for j in range(ck.config.n_routed_experts):
            p = f"model.layers.{layer}.mlp.experts.{j}"
            w = {
                n: ref_int4_dequant(ck.get(f"{p}.{n}.weight_packed"), ck.get(f"{p}.{n}.weight_scale"))
                for n in ("gate_proj", "up_proj", "down_proj")
            }
            with torch.no_grad():
                experts.gate_up_proj[j].copy_(torch.cat([w["gate_proj"], w["up_proj"]]))
                experts.down_proj[j].copy_(w["down_proj"])
    return model


@pytest.mark.parametrize("member", MEMBERS)
def test_logits_equal_transformers(members, member: str, tmp_path: Path) -> None:
    """Must-show 1: float32 logits of the stored format and of the bf16 conversion equal transformers' on
    the same weights within 1e-4 (full sequence and cached decode); the tiny preset has the member's shape."""
    src, bf16 = members[member]
    cfg = ModelConfig.from_file(src)
    assert cfg.family == member
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_bf16 = _hf_reference(bf16, tmp_path / "a", bf16)(ids).logits
        ref_src = (
            _hf_reference(bf16, tmp_path / "b", src)(ids).logits if cfg.quant.method == "int4" else ref_bf16
        )
        for path, ref in ((src, ref_src), (bf16, ref_bf16)):
            model = load_model(path, dtype=torch.float32)
            assert rel_err(model(ids), ref) < 1e-4, path.name
            cache = model.new_cache(2, SEQ)
            steps = [model(ids[:, :20], cache=cache)]
            steps += [model(ids[:, i : i + 1], start_pos=i, cache=cache) for i in range(20, SEQ)]
            assert rel_err(torch.cat(steps, 1), ref) < 1e-4, path.name


@pytest.mark.parametrize("member", MEMBERS)
def test_dequantization_bit_exact(members, member: str) -> None:
    """Must-show 1: every linear of the bf16 conversion is bf16 of the formula applied to the stored codes
    (fp8: q * block scale, ue8m0 scales for v3.1; int4 group 32: q * group scale)."""
    src, bf16 = members[member]
    a, b = Checkpoint(src), Checkpoint(bf16)
    seen = set()
    for w in a.expected():
        if not (w.linear and w.quantizable):
            continue
        fmt = a.linear_format(w.name)
        seen.add(fmt)
        got = b.get(f"{w.name}.weight")
        if fmt == "fp8":
            s = a.get(f"{w.name}.weight_scale_inv")
            if member == "v3.1":
                assert torch.equal(s, torch.exp2(torch.log2(s).round())), w.name  # ue8m0: powers of two
            want = ref_fp8_dequant(a.get(f"{w.name}.weight"), s)
        elif fmt == "int4":
            assert a.get(f"{w.name}.weight_scale").shape[1] == w.shape[1] // 32
            want = ref_int4_dequant(a.get(f"{w.name}.weight_packed"), a.get(f"{w.name}.weight_scale"))
        else:
            want = a.get(f"{w.name}.weight").float()
        assert torch.equal(got, want.to(torch.bfloat16)), w.name
    expected = {"kimi-k2-thinking": {"int4", "bf16"}, "moonlight": {"bf16"}}.get(member, {"fp8"})
    assert seen == expected


def test_config_and_layout_of_each_member(members) -> None:
    """The member's own fields reach the config and the layout (SPEC sec. 10)."""
    k2 = ModelConfig.from_file(members["kimi-k2"][0])
    assert (k2.n_group, k2.topk_group, k2.num_nextn_predict_layers, k2.family) == (1, 1, 0, "kimi-k2")
    assert k2.rope_scaling_dict["beta_fast"] == 1.0 and k2.routed_scaling_factor == 2.827
    moon = ModelConfig.from_file(members["moonlight"][0])
    names = {w.name: w for w in model_weights(moon)}
    assert moon.q_lora_rank == 0 and "model.layers.0.self_attn.q_proj" in names
    assert not any("q_a_proj" in n or "q_b_proj" in n for n in names)
    shared = names["model.layers.1.mlp.shared_experts.gate_proj"]
    assert shared.shape == (moon.moe_intermediate_size * 2, moon.hidden_size)
    thinking = ModelConfig.from_file(members["kimi-k2-thinking"][0])
    assert (thinking.quant.method, thinking.quant.group_size, thinking.rms_norm_eps) == ("int4", 32, 1e-5)
    assert ModelConfig.from_file(members["v3.1"][0]).quant.scale_fmt == "ue8m0"


# ---- full scale: parameter counts against transformers on the meta device ------------------------------
def _hf_meta_count(member: str) -> int:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = preset_config("full", family=member)
    d = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "quantization_config")}
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**d))
    return sum(v.numel() for v in model.state_dict().values())  # the correction biases are buffers


@pytest.mark.parametrize("member", MEMBERS)
def test_full_sparse_counts_equal_transformers(member: str, tmp_path: Path) -> None:
    """Must-show 2: inspect --json on `full --sparse` names the member; its main parameters equal
    transformers' meta-device model's (MTP excluded on both sides); bytes equal the headers' sum; < 100 MB."""
    out = tmp_path / member
    r = run_cli("synth", "--out", out, "--preset", "full", "--sparse", "--family", member, "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", "--model", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["family"] == member and rep["problems"] == []
    assert rep["params_main"] == _hf_meta_count(member)
    ck = Checkpoint(out, validate=False)
    assert rep["bytes_total"] == sum(i.nbytes for i in ck.infos().values())
    assert sum(f.stat().st_blocks * 512 for f in out.iterdir()) < 100 * 2**20
    if member in ("kimi-k2", "kimi-k2-thinking"):
        assert rep["params_main"] == 1_026_408_232_448 and rep["mtp_layers"] == []


def test_kimi_reshard_dry_run_bytes_per_rank(tmp_path: Path) -> None:
    """Must-show 4: 384 experts + 16 redundant over 16 GPUs (n_group 1: the global policy), bytes per rank."""
    out = tmp_path / "k2"
    assert (
        run_cli("synth", "--out", out, "--preset", "full", "--sparse", "--family", "kimi-k2").returncode == 0
    )
    r = run_cli("reshard", "--model", out, "--gpus", "16", "--redundant-experts", "16", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert len(plan["bytes_per_rank"]) == 16 and min(plan["bytes_per_rank"]) > 0
    assert sum(plan["bytes_per_rank"]) == plan["total_bytes"]
    assert plan["placement"]["num_physical"] == 400 and plan["placement"]["num_logical"] == 384
    assert plan["placement"]["num_nodes"] == 1  # n_group 1: no groups to keep together, the global policy
    assert len(plan["placement"]["layers"]) == 60  # first_k_dense_replace 1 of 61 layers, no MTP


# ---- Kimi-K2-Thinking: int4 group 32 -------------------------------------------------------------------
def test_thinking_int4_read_back_by_compressed_tensors(members, tmp_path: Path) -> None:
    """Must-show 3: compressed-tensors' own decompressor gives exactly our dequantization at group 32, and
    `convert --to fp8` of the checkpoint loads and runs."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from dsv3tools.model.linear import Linear, dequant_weight

    src = members["kimi-k2-thinking"][0]
    ck = Checkpoint(src)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert scheme.weights.group_size == 32
    n = 0
    for w in ck.expected():
        if w.linear and ck.linear_format(w.name) == "int4":
            sd = {k: ck.get(f"{w.name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
            theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            lin = Linear(w.shape[1], w.shape[0])
            lin.weight_packed, lin.weight_scale = sd["weight_packed"], sd["weight_scale"]
            assert torch.equal(theirs, dequant_weight(lin, theirs.dtype)), w.name
            n += 1
    assert n == 3 * ck.config.n_routed_experts * len(ck.config.moe_layers)
    fp8 = tmp_path / "fp8"
    convert(src, fp8, ConvertOptions("fp8"))
    assert Checkpoint(fp8).problems() == []
    assert ModelConfig.from_file(fp8).family == "kimi-k2-thinking"  # the member, now stored in FP8
    logits = load_model(fp8, dtype=torch.float32)(torch.arange(16).view(1, 16))
    assert torch.isfinite(logits).all()


# ---- tokenizers, eval, generate ------------------------------------------------------------------------
KIMI_PATTERN = "|".join(  # Moonshot's tokenization_kimi.py, restated here as the independent reference
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
TEXT = "The capital of France is Paris.\n\n  Tokyo 2024: 東京 is Japan's capital!<|im_end|>"


def test_tiktoken_encoding_equals_tiktoken(members) -> None:
    """Must-show 5: our tokenization of a tiktoken checkpoint equals tiktoken's own encode (specials
    recognised); BOS policy: none for tiktoken (Moonshot's tokenizer adds none), prepend for DeepSeek's."""
    import tiktoken

    from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer

    src = members["moonlight"][0]
    lines = (src / "tiktoken.model").read_text().split()
    ranks = {base64.b64decode(t): int(r) for t, r in zip(lines[::2], lines[1::2], strict=True)}
    added = json.loads((src / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    specials = {f"<|reserved_token_{i}|>": i for i in range(len(ranks), len(ranks) + 256)}
    specials = {v: k for k, v in specials.items()} | {int(i): t["content"] for i, t in added.items()}
    enc = tiktoken.Encoding(
        "ref", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens={v: k for k, v in specials.items()}
    )
    tok = load_tokenizer(src)
    want = enc.encode(TEXT, allowed_special="all")
    assert tok.kind == "tiktoken" and encode(tok, TEXT) == want
    assert want[-1] == len(ranks) + 2 and len(want) < len(TEXT.encode())  # <|im_end|>; merges applied
    assert tok.decode(want, skip_special_tokens=False) == TEXT
    cfg = ModelConfig.from_file(src)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (cfg.bos_token_id, cfg.eos_token_id, False)
    ds = load_tokenizer(members["v3.1"][0])
    assert ds.kind == "tokenizers" and encode(ds, "ab")[0] == 0 and ds.add_bos


def test_eval_and_generate_on_tiktoken_member(members) -> None:
    """Must-show 5: eval on the local task and generate run on a tiktoken-tokenized member; eval reports its
    tokenizer and BOS policy."""
    src = members["kimi-k2"][0]
    r = run_cli("eval", "--model", src, "--task", "tinyfacts", "--limit", "4", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["tokenizer"], rep["bos_policy"]) == ("tiktoken", "none")
    assert rep["n_samples"]["tinyfacts"] == 4 and "acc" in json.dumps(rep["metrics"])
    r = run_cli(
        "generate", "--model", src, "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) == 4


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"]}, "DeepSeek-V2/V2.5"),
        ({"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]}, "DeepSeek-V4"),
        (
            {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"]},
            "Mistral Large 3",
        ),
    ],
)
def test_unsupported_relatives_exit_2(members, tmp_path: Path, changes: dict, named: str) -> None:
    """Must-show 6: an unsupported relative exits 2 naming it."""
    bad = tmp_path / "relative"
    shutil.copytree(members["v3.1"][0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, **changes)))
    r = run_cli("inspect", "--model", bad)
    assert r.returncode == 2 and named in r.stderr and "not supported" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_tokenizer_and_no_mtp_exit_2(members, tmp_path: Path) -> None:
    """Must-show 6: a Kimi checkpoint without its tokenizer files exits 2 from generate and eval naming the
    missing file; split-mtp, mtp-bench and generate --mtp on a member without MTP exit 2 saying so."""
    src = members["kimi-k2"][0]
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "tiktoken.model").unlink()
    for args in (("generate", "--prompt", "hi"), ("eval", "--task", "tinyfacts", "--limit", "2")):
        r = run_cli(*args, "--model", bare)
        assert r.returncode == 2 and "tiktoken.model" in r.stderr, r.stderr
    (bare / "tiktoken.model").write_bytes((src / "tiktoken.model").read_bytes())
    (bare / "tokenizer_config.json").unlink()
    r = run_cli("generate", "--prompt", "hi", "--model", bare)
    assert r.returncode == 2 and "tokenizer_config.json" in r.stderr, r.stderr
    for args in (
        ("split-mtp", "--out", tmp_path / "s"),
        ("mtp-bench",),
        ("generate", "--prompt", "hi", "--mtp"),
    ):
        r = run_cli(*args, "--model", src)
        assert r.returncode == 2 and "MTP" in r.stderr, (args, r.stderr)
    assert not (tmp_path / "s").exists()


# ---- every command on a member -------------------------------------------------------------------------
@pytest.mark.parametrize(("member", "group"), [("kimi-k2", 32), ("kimi-k2-thinking", 128)])
def test_int4_group_size_written_and_read(members, tmp_path: Path, member: str, group: int) -> None:
    """int4 at group 32 and 128, both written (`--group-size`) and read: compressed-tensors' decompressor
    equals our dequantization, and the result runs (Kimi-K2 fp8 -> g32; K2-Thinking g32 -> g128)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "int4"
    convert(members[member][0], out, ConvertOptions("int4", group_size=group))
    ck = Checkpoint(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert ck.config.quant.group_size == group == scheme.weights.group_size
    p = f"model.layers.{ck.config.moe_layers[0]}.mlp.experts.3.down_proj"
    sd = {k: ck.get(f"{p}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
    assert sd["weight_scale"].shape[1] == ck.config.moe_intermediate_size // group
    theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    assert torch.equal(theirs, ref_int4_dequant(sd["weight_packed"], sd["weight_scale"]).to(theirs.dtype))
    assert torch.isfinite(load_model(out, dtype=torch.float32)(torch.arange(8).view(1, 8))).all()


def test_compare_and_expert_load_on_moonlight(members, tmp_path: Path) -> None:
    """compare (tiktoken-tokenized) of the stored BF16 against its bf16 conversion is exact; expert-load
    records all 64-expert-shaped rows of the member's MoE layers."""
    src, bf16 = members["moonlight"]
    r = run_cli("compare", "--model", src, "--against", bf16, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["top1_agreement"] == 1.0 and rep["max_abs_logit_diff"] == 0.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is Paris.\nWater boils at one hundred degrees.\n")
    r = run_cli(
        "expert-load", "--model", src, "--prompts", prompts, "--out", tmp_path / "load.json", "--json"
    )
    assert r.returncode == 0, r.stderr
    rep, cfg = json.loads(r.stdout), ModelConfig.from_file(src)
    assert sorted(map(int, rep["layers"])) == cfg.moe_layers
    assert all(len(row) == cfg.n_routed_experts for row in rep["layers"].values())
    assert sum(rep["layers"][str(cfg.moe_layers[0])]) == rep["tokens"] * cfg.num_experts_per_tok


def test_torchrun_moonlight_two_ranks_equal_one_process(members, tmp_path: Path) -> None:
    """reshard of a q_proj member (its query split by heads), n_group 1 (global policy), then the
    distributed forward over 2 gloo ranks equals one process within 1e-5."""
    import os
    import subprocess
    import sys

    from dsv3tools.converters.reshard import ReshardOptions, reshard

    src = members["moonlight"][0]
    ep = tmp_path / "ep2"
    r = reshard(src, ep, ReshardOptions(2, num_redundant=2))
    assert r["placement"]["num_nodes"] == 1
    tests = Path(__file__).parent
    sys.path.insert(0, str(tests))
    from dist_worker import run as run_checks

    dest = tmp_path / "logits.pt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(tests / "dist_worker.py"), str(ep), str(dest)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = torch.load(dest), run_checks(load_model(src, dtype=torch.float32))
    assert sorted(got) == sorted(ref) == ["decode", "logits", "routing"]
    for key in ("logits", "decode"):
        a, b = ref[key].float(), got[key].float()
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()), key
    assert torch.equal(ref["routing"], got["routing"])


def test_reshard_deepseek_format_refuses_kimi(members, tmp_path: Path) -> None:
    r = run_cli(
        "reshard", "--model", members["kimi-k2"][0], "--gpus", "2", "--format", "deepseek", "--dry-run"
    )
    assert r.returncode == 2 and "kimi-k2" in r.stderr and "--format dsv3tools" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("member", "to", "scope"),
    [("moonlight", "nvfp4", "all"), ("kimi-k2-thinking", "mxfp4", "experts"), ("kimi-k2", "fp16", "experts")],
)
def test_fp4_and_fp16_targets_on_members(members, tmp_path: Path, member: str, to: str, scope: str) -> None:
    """The other targets on members: a valid checkpoint of the member that loads and runs, its linears in
    the target format (Moonlight's q_proj under `all`)."""
    out = tmp_path / to
    # fp16 from the bf16 conversion: bf16 values are exact in float16, so the logits must agree closely
    # (from fp8 the two roundings differ by a bf16 ulp, which flips expert choices of a random tiny model)
    convert(members[member][1 if to == "fp16" else 0], out, ConvertOptions(to, int4_scope=scope))
    ck = Checkpoint(out)
    assert ck.problems() == [] and ck.config.family == member
    fmts = {ck.linear_format(w.name) for w in ck.expected() if w.linear and w.quantizable}
    if to == "fp16":
        assert ck.get("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float16
    else:
        assert to in fmts
    if member == "moonlight":
        assert ck.linear_format("model.layers.0.self_attn.q_proj") == "nvfp4"
    ids = torch.arange(12).view(1, 12)
    got = load_model(out, dtype=torch.float32)(ids)
    ref = load_model(members[member][1], dtype=torch.float32)(ids)
    assert rel_err(got, ref) < (1e-5 if to == "fp16" else 0.5)
