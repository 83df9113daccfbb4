"""convert: fp8 <-> bf16 <-> int4 against independent formulas written here, compressed-tensors read-back,
resume after SIGKILL, --part/--workers byte identity, and bad-input exit codes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3tools.checkpoint.reader import Checkpoint, read_header
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.converters.convert import ConvertOptions, convert
from dsv3tools.converters.tensor_io import ShardReader
from dsv3tools.quant.bands import SourceWeight, encode_int4
from tests.conftest import ROOT, SPEC_INT4_WEIGHTS, raw_tensors, rss_file_kib, run_cli

E4M3 = torch.float8_e4m3fn


# ---- independent references (deliberately not dsv3tools.quant.reference) -------------------------------------
def ref_fp8_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 w[i, j] = float(q[i, j]) * s[i // 128, j // 128], block by block."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rs, cs = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[rs, cs] = q[rs, cs].float() * s[bi, bj].item()
    return out


def ref_fp8_quant(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """s = amax(block) / 448 (ue8m0: 2 ** ceil(log2 s)), q = e4m3(w / s), block by block."""
    w = w.float()
    gr, gc = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
    q = torch.empty(w.shape, dtype=E4M3)
    s = torch.empty((gr, gc), dtype=torch.float32)
    for bi in range(gr):
        for bj in range(gc):
            rs, cs = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            sc = torch.tensor(w[rs, cs].abs().max().item(), dtype=torch.float32) / 448.0
            if ue8m0:
                sc = torch.tensor(2.0 ** math.ceil(math.log2(sc.item())), dtype=torch.float32)
            s[bi, bj] = sc
            q[rs, cs] = (w[rs, cs] / sc).clamp(-448, 448).to(E4M3)
    return q, s


def ref_int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Nibble j of word k is column 8k + j, stored as q + 8."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [((words >> (4 * j)) & 0xF) - 8 for j in range(8)]
    return torch.stack(cols, dim=-1).reshape(packed.shape[0], -1)


def ref_int4_dequant(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = ref_int4_unpack(packed).float()
    group = q.shape[1] // scale.shape[1]
    return q * scale.float().repeat_interleave(group, dim=1)


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def final_files(folder: Path) -> dict[str, bytes]:
    """Every file under its final name (not the writer's state folder)."""
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
    }


def linears(ck: Checkpoint) -> list:
    return [w for w in ck.expected() if w.linear and w.quantizable]


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def bf16_from_fp8(tiny_fp8: Path, work: Path) -> tuple[Path, dict]:
    out, report = work / "bf16", work / "bf16-report.json"
    r = run_cli("convert", "--model", tiny_fp8, "--to", "bf16", "--out", out, "--report", report, "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(report.read_text())


# ---- 1. fp8 -> bf16 ------------------------------------------------------------------------------------
def test_fp8_to_bf16_is_the_formula_bit_for_bit(tiny_fp8: Path, bf16_from_fp8: tuple[Path, dict]) -> None:
    out, report = bf16_from_fp8
    src, dst = Checkpoint(tiny_fp8), Checkpoint(out)
    assert dst.problems() == []
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert len(dst.shards) == len(src.shards)
    src_raw, dst_raw = raw_tensors(tiny_fp8), raw_tensors(out)
    done = set()
    for w in linears(src):
        q, s = src.get(f"{w.name}.weight"), src.get(f"{w.name}.weight_scale_inv")
        got = dst.get(f"{w.name}.weight")
        assert got.dtype == torch.bfloat16
        assert torch.equal(
            got.view(torch.int16), ref_fp8_dequant(q, s).to(torch.bfloat16).view(torch.int16)
        ), w.name
        done |= {f"{w.name}.weight", f"{w.name}.weight_scale_inv"}
    assert any(w.shape[0] % 128 for w in linears(src))  # a ragged tensor was covered
    for name in set(src_raw) - done:
        assert dst_raw[name] == src_raw[name], name  # every non-quantized tensor byte-identical
    assert set(dst_raw) == (set(src_raw) - {n for n in done if n.endswith("_scale_inv")})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tiny_fp8 / f).read_bytes()
    # the report: every linear, relative error as computed here
    assert len(report["tensors"]) == len(linears(src))
    e = report["tensors"][0]
    w32 = ref_fp8_dequant(src.get(f"{e['name']}.weight"), src.get(f"{e['name']}.weight_scale_inv")).double()
    mine = ((dst.get(f"{e['name']}.weight").double() - w32).norm() / w32.norm()).item()
    assert e["rel_error"] == pytest.approx(mine, rel=1e-9)
    assert report["mean_rel_error"] == pytest.approx(
        sum(t["rel_error"] for t in report["tensors"]) / len(report["tensors"])
    )


# ---- 2. bf16 -> fp8 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_bf16_to_fp8_matches_the_recipe(tiny_bf16: Path, work: Path, scale_fmt: str) -> None:
    out = work / f"fp8-{scale_fmt}"
    convert(tiny_bf16, out, ConvertOptions("fp8", scale_fmt=scale_fmt))
    src, dst = Checkpoint(tiny_bf16), Checkpoint(out)
    assert dst.problems() == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    expect = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert qc == (dict(expect, scale_fmt="ue8m0") if scale_fmt == "ue8m0" else expect)
    for w in linears(src):
        q, s = ref_fp8_quant(src.get(f"{w.name}.weight"), ue8m0=scale_fmt == "ue8m0")
        assert torch.equal(dst.get(f"{w.name}.weight").view(torch.uint8), q.view(torch.uint8)), w.name
        assert torch.equal(dst.get(f"{w.name}.weight_scale_inv"), s), w.name
    assert Checkpoint(out).info("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (
        2,
        2,
    )


def test_fp8_bf16_fp8_round_trip(tiny_fp8: Path, bf16_from_fp8: tuple[Path, dict], work: Path) -> None:
    out = work / "fp8-again"
    convert(bf16_from_fp8[0], out, ConvertOptions("fp8"))
    src, dst = Checkpoint(tiny_fp8), Checkpoint(out)
    for w in linears(src):
        assert torch.equal(
            dst.get(f"{w.name}.weight").view(torch.uint8), src.get(f"{w.name}.weight").view(torch.uint8)
        )
        s0, s1 = src.get(f"{w.name}.weight_scale_inv"), dst.get(f"{w.name}.weight_scale_inv")
        assert ((s1 - s0).abs() <= s0 * 2.0**-8).all(), w.name  # within bf16 rounding of amax
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_fp8 / "config.json").read_text())


def test_same_format_is_a_copy_and_scale_fmt_change_requantizes(tiny_fp8: Path, work: Path) -> None:
    same, ue = work / "fp8-copy", work / "fp8-to-ue8m0"
    convert(tiny_fp8, same, ConvertOptions("fp8"))
    assert raw_tensors(same) == raw_tensors(tiny_fp8)
    convert(tiny_fp8, ue, ConvertOptions("fp8", scale_fmt="ue8m0"))
    src, dst = Checkpoint(tiny_fp8), Checkpoint(ue)
    for w in linears(src)[:12]:
        w32 = ref_fp8_dequant(src.get(f"{w.name}.weight"), src.get(f"{w.name}.weight_scale_inv"))
        q, s = ref_fp8_quant(w32, ue8m0=True)
        assert torch.equal(dst.get(f"{w.name}.weight").view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(dst.get(f"{w.name}.weight_scale_inv"), s)


# ---- 3. int4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["experts", "all"])
def test_int4_read_back_by_compressed_tensors(tiny_fp8: Path, work: Path, scope: str) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    out = work / f"int4-{scope}"
    convert(tiny_fp8, out, ConvertOptions("int4", int4_scope=scope))
    src, dst = Checkpoint(tiny_fp8), Checkpoint(out)
    assert dst.problems() == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "format", "quantization_status")} == {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
    }
    assert qc["config_groups"] == {
        "group_0": {
            "targets": ["Linear"],
            "weights": SPEC_INT4_WEIGHTS,
            "input_activations": None,
            "output_activations": None,
        }
    }
    assert "lm_head" in qc["ignore"] and r"re:.*mlp\.gate$" in qc["ignore"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    fused = {"fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"], "gate_up_proj": ["gate_proj", "up_proj"]}
    linear = torch.nn.Linear(1, 1)
    n_int4 = 0
    for w in linears(src):
        fmt = dst.linear_format(w.name)
        assert fmt == ("int4" if scope == "all" or ".mlp.experts." in w.name else "bf16"), w.name
        # vLLM's compressed-tensors matching quantizes exactly the modules stored as int4
        assert is_match(w.name, linear, ["Linear"], qc["ignore"], fused) == (fmt == "int4"), w.name
        fused_name = w.name.replace("q_a_proj", "fused_qkv_a_proj").replace("gate_proj", "gate_up_proj")
        assert is_match(fused_name, linear, ["Linear"], qc["ignore"], fused) == (fmt == "int4"), fused_name
        if fmt != "int4":
            w32 = ref_fp8_dequant(src.get(f"{w.name}.weight"), src.get(f"{w.name}.weight_scale_inv"))
            assert torch.equal(dst.get(f"{w.name}.weight"), w32.to(torch.bfloat16))
            continue
        sd = {k: dst.get(f"{w.name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
        assert sd["weight_shape"].tolist() == list(w.shape)
        theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        ours = ref_int4_dequant(sd["weight_packed"], sd["weight_scale"])
        assert torch.equal(theirs, ours.to(theirs.dtype)), w.name
        n_int4 += 1
    for name in ("model.layers.3.mlp.gate.weight", "lm_head.weight", "model.layers.3.eh_proj.weight"):
        assert not is_match(name.removesuffix(".weight"), linear, ["Linear"], qc["ignore"], fused)
        assert raw_tensors(out)[name] == raw_tensors(tiny_fp8)[name]
    assert n_int4 > 0


def test_int4_packing_on_a_hand_written_example(tiny_bf16: Path, work: Path) -> None:
    src = work / "hand-src"
    shutil.copytree(tiny_bf16, src)
    name = "model.layers.1.mlp.experts.0.down_proj.weight"  # [256, 128]: one group per row
    shard = src / Checkpoint(src).weight_map[name]
    tensors = load_file(shard)
    w = torch.zeros(256, 128)
    w[:, :8] = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, 0])
    w[:, 127] = 7.5  # amax 7.5 -> scale exactly 1.0; 7.5 rounds to 8 and clamps to 7
    tensors[name] = w.to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    out = work / "hand-int4"
    convert(src, out, ConvertOptions("int4"))
    ck = Checkpoint(out)
    p = name.removesuffix(".weight")
    packed, scale = ck.get(f"{p}.weight_packed"), ck.get(f"{p}.weight_scale")
    assert packed.dtype == torch.int32 and packed.shape == (256, 16)
    # nibbles q + 8 = 9, 6, 11, 4, 13, 2, 15, 8 -> word 0x8F2D4B69 (column j in bits 4j..4j+3)
    assert packed[0, 0].item() == 0x8F2D4B69 - 2**32
    assert packed[0, 1:15].tolist() == [0x88888888 - 2**32] * 14  # zeros are stored as 8
    assert packed[0, 15].item() == 0xF8888888 - 2**32  # column 127: q = 7 -> 15 in the top nibble
    assert scale.dtype == torch.bfloat16 and (scale.float() == 1.0).all()
    assert ck.get(f"{p}.weight_shape").tolist() == [256, 128]


def test_mse_beats_rtn(tiny_fp8: Path, work: Path) -> None:
    means = {}
    for method in ("rtn", "mse"):
        report = work / f"int4-{method}.json"
        r = convert(
            tiny_fp8, work / f"int4-x-{method}", ConvertOptions("int4", int4_method=method), report=report
        )
        means[method] = r["report"]["mean_rel_error"]
        rep = json.loads(report.read_text())
        assert rep["mean_rel_error"] == means[method] and {t["to"] for t in rep["tensors"]} == {
            "int4",
            "bf16",
        }
        assert rep["mean_rel_error_by_format"]["int4"] > 10 * rep["mean_rel_error_by_format"]["bf16"]
        means[method] = rep["mean_rel_error_by_format"]["int4"]
    assert means["mse"] < means["rtn"]
    qc = json.loads((work / "int4-x-mse" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["observer"] == "mse"
    # a real expert shape [2048, 7168] (the true group structure along 7168): mse still wins
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2048, 7168, generator=g) * 7168**-0.5).to(torch.bfloat16)[:256]
    sw = SourceWeight({"x.weight": w}.__getitem__, "x", "bf16", (256, 7168), (128, 128))
    errs = {}
    for method in ("rtn", "mse"):
        packed, scale = encode_int4(sw, 128, method)
        errs[method] = (
            (ref_int4_dequant(packed, scale) - w.float()).double().norm() / w.double().norm()
        ).item()
    assert errs["mse"] < errs["rtn"]


def test_int4_to_bf16_fp8_and_int4(work: Path, tiny_fp8: Path) -> None:
    int4 = work / "int4-src"
    convert(tiny_fp8, int4, ConvertOptions("int4", int4_scope="all"))
    src = Checkpoint(int4)
    bf16, fp8, int4b, same = work / "i2b", work / "i2f", work / "i2i", work / "i2same"
    convert(int4, bf16, ConvertOptions("bf16"))
    convert(int4, fp8, ConvertOptions("fp8"))
    convert(int4, int4b, ConvertOptions("int4", int4_scope="all", group_size=64))
    convert(int4, same, ConvertOptions("int4", int4_scope="all"))
    assert raw_tensors(same) == raw_tensors(int4)
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    b, f, i = Checkpoint(bf16), Checkpoint(fp8), Checkpoint(int4b)
    assert b.problems() == f.problems() == i.problems() == []
    for w in linears(src):
        w32 = ref_int4_dequant(src.get(f"{w.name}.weight_packed"), src.get(f"{w.name}.weight_scale"))
        assert torch.equal(b.get(f"{w.name}.weight"), w32.to(torch.bfloat16)), w.name
        q, s = ref_fp8_quant(w32)
        assert torch.equal(f.get(f"{w.name}.weight").view(torch.uint8), q.view(torch.uint8)), w.name
        assert torch.equal(f.get(f"{w.name}.weight_scale_inv"), s)
        assert i.get(f"{w.name}.weight_scale").shape == (w.shape[0], w.shape[1] // 64)


# ---- streaming: --part, --workers, dry run, resume after SIGKILL ----------------------------------------
def test_parts_workers_and_dry_run_are_byte_identical(tiny_fp8: Path, work: Path) -> None:
    ref, multi, parts = work / "p-ref", work / "p-workers", work / "p-parts"
    plan = convert(tiny_fp8, work / "p-dry", ConvertOptions("int4"), dry_run=True)
    assert not (work / "p-dry").exists()
    convert(tiny_fp8, ref, ConvertOptions("int4"))
    order: list[int] = []
    convert(tiny_fp8, multi, ConvertOptions("int4"), workers=2, on_shard=lambda s, n: order.append(s.nbytes))
    assert folder_digest(multi) == folder_digest(ref)
    assert len(order) > 2 and order == sorted(order, reverse=True)  # workers take the largest shards first
    r1 = convert(tiny_fp8, parts, ConvertOptions("int4"), part=(1, 2))
    assert (
        not r1["complete"]
        and not (parts / "config.json").exists()
        and not (parts / "model.safetensors.index.json").exists()
    )
    r2 = convert(tiny_fp8, parts, ConvertOptions("int4"), part=(2, 2))
    assert r2["complete"] and set(r1["written"]).isdisjoint(r2["written"])
    r3 = convert(tiny_fp8, parts, ConvertOptions("int4"))
    assert r3["written"] == [] and r3["complete"]
    assert folder_digest(parts) == folder_digest(ref)
    sizes = {p.name: p.stat().st_size for p in ref.glob("model-*.safetensors")}
    assert {s["file"]: s["bytes"] for s in plan["shards"]} == {
        k: v - _header_len(ref / k) for k, v in sizes.items()
    }
    assert (
        plan["bytes_out"]
        == json.loads((ref / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    )


def test_reader_release_drops_resident_pages(work: Path) -> None:
    path = work / "release.safetensors"
    save_file({"a": torch.ones(16 << 20), "b": torch.ones(1024)}, path)  # a: 64 MiB
    reader = ShardReader(work, read_header(path))
    before = rss_file_kib()
    assert float(reader.get("a").sum()) == 16 << 20  # touches every page
    touched = rss_file_kib()
    reader.release("a")
    released = rss_file_kib()
    assert touched - before > 48 << 10 and touched - released > 48 << 10
    assert float(reader.get("a").sum()) == 16 << 20  # still readable after release (re-faulted)


def test_convert_releases_all_but_the_last_two_source_linears(
    tiny_fp8: Path, work: Path, monkeypatch
) -> None:
    released: list[str] = []
    real = ShardReader.release
    monkeypatch.setattr(ShardReader, "release", lambda self, n: released.append(n) or real(self, n))
    convert(tiny_fp8, work / "rel", ConvertOptions("bf16"))
    linears = {
        n.removesuffix(".weight_scale_inv") for n in Checkpoint(tiny_fp8).weight_map if "scale_inv" in n
    }
    done = {n.removesuffix(".weight") for n in released if n.endswith(".weight")}
    shards = {Checkpoint(tiny_fp8).infos()[n + ".weight"].shard for n in linears}
    assert done < linears and len(linears - done) <= 2 * len(shards)
    assert {n + ".weight_scale_inv" for n in done} <= set(released)


@pytest.mark.parametrize("missing", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_byte_copies_across_file_systems_are_identical(
    tiny_fp8: Path, work: Path, monkeypatch, missing
) -> None:
    """Across file systems ``copy_file_range`` fails with EXDEV: byte copies fall back to ``sendfile``, then to
    reads and writes; the output is the same bytes."""
    ref = work / "x-ref"
    if not ref.exists():
        convert(tiny_fp8, ref, ConvertOptions("bf16"))

    def exdev(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    for name in missing:
        monkeypatch.setattr(os, name, exdev)
    out = work / f"x-{len(missing)}"
    convert(tiny_fp8, out, ConvertOptions("bf16"))
    assert folder_digest(out) == folder_digest(ref)


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_sigkill_halfway_then_resume_is_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    synthesize(src, preset="tiny", seed=1, max_shard_bytes=120_000)
    n_shards = len(Checkpoint(src).shards)
    assert n_shards >= 40
    args = ["convert", "--model", src, "--to", "int4", "--int4-scope", "all"]
    clean = tmp_path / "clean"
    assert run_cli(*args, "--out", clean).returncode == 0
    expect = final_files(clean)
    out = tmp_path / "killed"
    # 0: every finished shard becomes final at once (the default batches them every 30 s)
    env = dict(os.environ, DSV3TOOLS_NO_PROGRESS="1", DSV3TOOLS_SYNC_INTERVAL="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv3tools", *map(str, args), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done_dir, checked = out / ".dsv3tools" / "done", set()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= n_shards // 3:
            proc.send_signal(signal.SIGKILL)
            break
        for p in out.glob("model-*.safetensors") if out.is_dir() else ():
            if p.name not in checked:  # never partial under a final name: complete the moment it appears
                assert p.read_bytes() == expect[p.name], p.name
                checked.add(p.name)
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, "conversion finished before it could be killed"
    left = final_files(out)
    assert 0 < len(left) < n_shards and all(left[n] == expect[n] for n in left)
    assert "config.json" not in left and "model.safetensors.index.json" not in left
    r = run_cli(*args, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"]  # finished shards were not redone
    assert final_files(out) == expect


# ---- 6. bad input ---------------------------------------------------------------------------------------
def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _in_process(capsys: pytest.CaptureFixture, *args: object) -> subprocess.CompletedProcess:
    """The CLI's own entry point in this process (same error handling as ``python -m dsv3tools``)."""
    from dsv3tools.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, cap.out, cap.err)


def test_bad_input_exits_2_and_never_modifies_input(
    tiny_fp8: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    # missing scale
    bad = tmp_path / "noscale"
    shutil.copytree(tiny_fp8, bad)
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    before = folder_digest(bad)
    _one_line_error(run_cli("convert", "--model", bad, "--to", "bf16", "--out", tmp_path / "o1"), name)
    assert folder_digest(bad) == before and not (tmp_path / "o1").exists()
    # corrupted (truncated) shard
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_fp8, trunc)
    victim = sorted(trunc.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = folder_digest(trunc)
    _one_line_error(
        _in_process(capsys, "convert", "--model", trunc, "--to", "int4", "--out", tmp_path / "o2"),
        victim.name,
    )
    assert folder_digest(trunc) == before
    # an output folder holding a different conversion
    before = folder_digest(src)
    out = tmp_path / "o3"
    assert _in_process(capsys, "convert", "--model", src, "--to", "bf16", "--out", out).returncode == 0
    out_before = folder_digest(out)
    _one_line_error(_in_process(capsys, "convert", "--model", src, "--to", "int4", "--out", out), str(out))
    assert folder_digest(out) == out_before
    # no space left
    monkeypatch.setenv("DSV3TOOLS_FAKE_FREE_BYTES", "1000")
    _one_line_error(
        _in_process(capsys, "convert", "--model", src, "--to", "bf16", "--out", tmp_path / "o4"), "disk space"
    )
    monkeypatch.delenv("DSV3TOOLS_FAKE_FREE_BYTES")
    assert not list((tmp_path / "o4").glob("model-*"))
    # bad options
    _one_line_error(
        _in_process(capsys, "convert", "--model", src, "--to", "int3", "--out", tmp_path / "o5"), "--to"
    )
    _one_line_error(
        _in_process(
            capsys, "convert", "--model", src, "--to", "int4", "--group-size", "96", "--out", tmp_path / "o6"
        ),
        "group-size",
    )
    assert folder_digest(src) == before
