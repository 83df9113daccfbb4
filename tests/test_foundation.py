"""Foundation: synth presets, inspect from headers, validation errors, determinism, config checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import preset_config, synthesize
from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from tests.conftest import rss_file_kib, run_cli


def _spec_names(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """SPEC sec. 3 written out independently of dsv3tools.checkpoint.layout: name -> (dtype, shape) for an FP8 release."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def lin(name: str, o: int, i: int, fp8: bool = True) -> None:
        if not fp8:
            out[f"{name}.weight"] = ("BF16", (o, i))
            return
        out[f"{name}.weight"] = ("F8_E4M3", (o, i))
        out[f"{name}.weight_scale_inv"] = ("F32", ((o + 127) // 128, (i + 127) // 128))

    def mlp(p: str, inter: int) -> None:
        lin(f"{p}.gate_proj", inter, h)
        lin(f"{p}.up_proj", inter, h)
        lin(f"{p}.down_proj", h, inter)

    out["model.embed_tokens.weight"] = ("BF16", (cfg["vocab_size"], h))
    out["model.norm.weight"] = ("BF16", (h,))
    out["lm_head.weight"] = ("BF16", (cfg["vocab_size"], h))
    n = cfg["num_hidden_layers"]
    for layer in range(n + cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{layer}"
        lin(f"{p}.self_attn.q_a_proj", cfg["q_lora_rank"], h)
        out[f"{p}.self_attn.q_a_layernorm.weight"] = ("BF16", (cfg["q_lora_rank"],))
        lin(f"{p}.self_attn.q_b_proj", nh * (nope + rope), cfg["q_lora_rank"])
        lin(f"{p}.self_attn.kv_a_proj_with_mqa", cfg["kv_lora_rank"] + rope, h)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = ("BF16", (cfg["kv_lora_rank"],))
        lin(f"{p}.self_attn.kv_b_proj", nh * (nope + v), cfg["kv_lora_rank"])
        lin(f"{p}.self_attn.o_proj", h, nh * v)
        out[f"{p}.input_layernorm.weight"] = ("BF16", (h,))
        out[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,))
        if layer < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        e = cfg["n_routed_experts"]
        out[f"{p}.mlp.gate.weight"] = ("BF16", (e, h))
        out[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (e,))
        for j in range(e):
            mlp(f"{p}.mlp.experts.{j}", cfg["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        if layer >= n:
            for t in ("embed_tokens", "shared_head.head"):
                out[f"{p}.{t}.weight"] = ("BF16", (cfg["vocab_size"], h))
            for t in ("enorm", "hnorm", "shared_head.norm"):
                out[f"{p}.{t}.weight"] = ("BF16", (h,))
            lin(f"{p}.eh_proj", h, 2 * h, fp8=False)
    return out


_ST = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}


def test_tiny_layout_follows_spec_and_inspect_counts(tiny_fp8: Path) -> None:
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    expected = _spec_names(cfg)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    total_bytes = 0
    shards = sorted(tiny_fp8.glob("model-*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                found[name] = (_ST[t.dtype], tuple(t.shape))
                total_bytes += t.numel() * t.element_size()
    assert found == expected
    # the tiny preset exercises the features SPEC names
    assert cfg["n_group"] > 1 and cfg["topk_group"] < cfg["n_group"]
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["num_nextn_predict_layers"] == 1
    kv_a = found["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][1][0]
    assert kv_a % 128 != 0, "the kv_a_proj scale grid must be ragged"
    tok = json.loads((tiny_fp8 / "tokenizer.json").read_text())
    specials = {t["id"]: t["content"] for t in tok["added_tokens"]}
    assert specials[0] == "<｜begin▁of▁sentence｜>" and specials[1] == "<｜end▁of▁sentence｜>"

    r = run_cli("inspect", "--model", tiny_fp8, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["num_tensors"] == len(found) and rep["bytes_total"] == total_bytes
    assert rep["num_shards"] == len(shards) and rep["problems"] == []
    params = {n: s for n, (dt, s) in expected.items() if not n.endswith("_scale_inv")}
    mtp_layer = f"model.layers.{cfg['num_hidden_layers']}."
    numel = {n: int(torch.tensor(s).prod()) for n, s in params.items()}
    assert rep["params_mtp"] == sum(v for n, v in numel.items() if n.startswith(mtp_layer))
    assert rep["params_main"] == sum(v for n, v in numel.items() if not n.startswith(mtp_layer))
    assert rep["format"] == "fp8"


def test_full_sparse_matches_the_release(tmp_path: Path) -> None:
    out = tmp_path / "full"
    r = run_cli("synth", "--out", out, "--preset", "full", "--sparse", "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", "--model", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["num_tensors"] == 91_991
    assert rep["bytes_total"] == 688_574_839_360
    assert rep["num_shards"] == 163
    assert rep["params_main"] == 671_026_419_200
    assert rep["params_mtp"] == 13_463_426_304
    assert rep["params_mtp_unique"] == 11_610_068_224
    assert rep["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2
    assert (out / "model-00001-of-000163.safetensors").is_file()
    used = sum(p.stat().st_blocks * 512 for p in out.rglob("*") if p.is_file())
    assert used < 10**9, f"sparse checkpoint uses {used} bytes of disk"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    mtp_shards = {s for n, s in index["weight_map"].items() if n.startswith("model.layers.61.")}
    assert max(mtp_shards) == "model-00163-of-000163.safetensors"


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_synth_is_deterministic(tmp_path: Path, tiny_fp8: Path) -> None:
    synthesize(tmp_path / "a", preset="tiny", seed=0)
    synthesize(tmp_path / "b", preset="tiny", seed=1)
    assert _digest(tmp_path / "a") == _digest(tiny_fp8)
    other = _digest(tmp_path / "b")
    assert other["config.json"] == _digest(tiny_fp8)["config.json"]
    assert (
        other["model-00001-of-000004.safetensors"] != _digest(tiny_fp8)["model-00001-of-000004.safetensors"]
    )


def test_synth_fp8_follows_formula(tiny_fp8: Path, tiny_bf16: Path) -> None:
    """Codes and scales of the fp8 preset are the SPEC recipe applied to the float32 values (float64 check)."""
    from dsv3tools.checkpoint.layout import model_weights
    from dsv3tools.checkpoint.synth import random_weight

    ck = Checkpoint(tiny_fp8)
    w = next(w for w in model_weights(ck.config) if w.name.endswith("layers.1.self_attn.kv_a_proj_with_mqa"))
    x = random_weight(w, 0).double()
    q, s = ck.get(f"{w.name}.weight"), ck.get(f"{w.name}.weight_scale_inv")
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = x[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert s[bi, bj].item() == pytest.approx(float(blk.abs().max() / 448), rel=1e-6)
            ref = (blk / s[bi, bj].double()).float().to(torch.float8_e4m3fn)
            got = q[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    bf = Checkpoint(tiny_bf16).get(f"{w.name}.weight")
    assert torch.equal(bf, x.float().to(torch.bfloat16))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _last_shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[-1]


def _rewrite_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _bad_truncated(d: Path) -> str:
    s = _last_shard(d)
    s.write_bytes(s.read_bytes()[:-1000])
    return s.name


def _bad_header(d: Path) -> str:
    s = _last_shard(d)
    raw = bytearray(s.read_bytes())
    raw[8:20] = b"\x00garbage!!\xff\xfe"
    s.write_bytes(bytes(raw))
    return s.name


def _bad_missing_file(d: Path) -> str:
    s = _last_shard(d)
    s.unlink()
    return s.name


def _bad_missing_scale(d: Path) -> str:
    name = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / idx["weight_map"].pop(name)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    tensors = load_file(shard)  # a valid shard without it (no gap where it was)
    del tensors[name]
    save_file(tensors, shard)
    return name


def _bad_shape(d: Path) -> str:
    name = "model.layers.0.self_attn.q_a_layernorm.weight"
    idx = json.loads((d / "model.safetensors.index.json").read_text())

    def edit(h: dict) -> None:
        a, _ = h[name]["data_offsets"]
        h[name]["shape"] = [h[name]["shape"][0] // 2, 2]

    _rewrite_header(d / idx["weight_map"][name], edit)
    return name


def _bad_config(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json"


@pytest.mark.parametrize(
    "breaker", [_bad_truncated, _bad_header, _bad_missing_file, _bad_missing_scale, _bad_shape, _bad_config]
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, tiny_fp8: Path, breaker) -> None:
    d = _copy(tiny_fp8, tmp_path / "ck")
    culprit = breaker(d)
    r = run_cli("inspect", "--model", d, "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and culprit in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_config_values_and_errors(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict(preset_config("full"))
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=5e-6)
    assert cfg.mtp_layers == [61] and cfg.moe_layers[0] == 3 and len(cfg.moe_layers) == 59
    assert cfg.quant.method == "fp8" and cfg.quant.block == (128, 128)
    d = preset_config("full")
    d["aux_loss_alpha"], d["seq_aux"], d["pretraining_tp"] = 0.001, True, 1
    ModelConfig.from_dict(d)  # extra fields of some copies are accepted
    bad = preset_config("full")
    bad["topk_group"] = 9
    with pytest.raises(DSV3Error, match="topk_group"):
        ModelConfig.from_dict(bad)
    del bad["hidden_size"]
    with pytest.raises(DSV3Error, match="hidden_size"):
        ModelConfig.from_dict(bad)


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("inspect", "--model", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr and "--model" in r.stderr


@pytest.mark.parametrize(
    "argv, said",
    [(["inspect", "--bogus"], "No such option: --bogus"), (["nosuchcmd"], "No such command 'nosuchcmd'")],
)
def test_usage_errors_exit_2_without_traceback(argv: list[str], said: str) -> None:
    r = run_cli(*argv)
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr


def test_batched_finish_keeps_written_shards_when_a_later_one_fails(tmp_path: Path) -> None:
    """Shards become final in batches; a failure mid-run still finalizes (durable, renamed, recorded) the
    shards written before it, never leaves one partial under its final name, and a re-run skips them."""
    from dsv3tools.checkpoint.writer import OutSpec, WriteJob, execute, plan_shards

    specs = [OutSpec(f"t{i}", "F32", (64,), key=i) for i in range(6)]
    shards = plan_shards(specs, max_shard_bytes=2 * 256)  # 3 shards of 2 tensors
    fail = {"at": 4}

    def produce(spec: OutSpec) -> torch.Tensor:
        if spec.key == fail["at"]:
            raise RuntimeError("producer failed")
        return torch.full((64,), float(spec.key))

    job = WriteJob(tmp_path / "out", shards, produce, None, "test")
    with pytest.raises(RuntimeError, match="producer failed"):
        execute(job)
    finals = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert finals == [shards[0].filename, shards[1].filename]
    assert [job.is_done(s) for s in shards] == [True, True, False]
    with safe_open(tmp_path / "out" / shards[1].filename, "pt") as f:
        assert torch.equal(f.get_tensor("t3"), torch.full((64,), 3.0))
    fail["at"] = None
    r = execute(job)
    assert r["skipped"] == finals and r["written"] == [shards[2].filename] and r["complete"]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_checkpoint_get_reads_nothing_until_used(tmp_path: Path, tiny_fp8: Path) -> None:
    """``Checkpoint.get`` hands out views on a map: opening 400 tensors (100 MiB) makes almost nothing
    resident (safetensors' ``safe_open().get_tensor`` made 85 MiB resident here), values are exact, and
    a tensor's pages become resident only when it is used."""
    shutil.copy(tiny_fp8 / "config.json", tmp_path / "config.json")
    tensors = {f"t{i:03d}": torch.full((64 << 10,), float(i)) for i in range(400)}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = Checkpoint(tmp_path, validate=False)  # tensors of no config: the reader alone
    before = rss_file_kib()
    views = {n: ck.get(n) for n in tensors}
    opened = rss_file_kib()
    assert opened - before < 8 << 10
    assert all(torch.equal(views[n], tensors[n]) for n in ("t000", "t399"))
    assert rss_file_kib() - opened < 8 << 10
    assert all(torch.equal(views[n], t) for n, t in tensors.items())
    assert rss_file_kib() - opened > 64 << 10
