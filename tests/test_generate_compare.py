"""``generate`` on fp8, bf16 and int4 tiny checkpoints (CLI and library, checked against a plain argmax loop
over full-sequence logits) and ``compare`` of fp8 vs its bf16 conversion (KL 0) and vs int4 (small KL).

The CLI runs in-process through ``dsv3tools.cli.main`` (the same error handling and exit codes as the
console script, without a Python start per call); its stdout/stderr come from ``capsys``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_model import write_bf16_conversion, write_int4

from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer
from dsv3tools.cli import main
from dsv3tools.model.api import load_model
from dsv3tools.model.compare import logit_stats
from dsv3tools.model.generate import generate


@pytest.fixture(scope="module")
def ckpts(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen")
    bf16 = write_bf16_conversion(tiny_fp8, d / "bf16")
    int4, _ = write_int4(bf16, d / "int4", d / "int4-deq")
    return {"fp8": tiny_fp8, "bf16": bf16, "int4": int4}


def run_cli(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    """``dsv3tools ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _greedy_reference(path: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (no cache)."""
    model = load_model(path)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.mark.parametrize("fmt", ["fp8", "bf16", "int4"])
def test_generate_cli(ckpts: dict[str, Path], capsys, fmt: str) -> None:
    code, stdout, stderr = run_cli(
        capsys,
        "generate",
        "--model",
        ckpts[fmt],
        "--prompt",
        "Hello, world",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["prompt_ids"][0] == 0 and len(out["prompt_ids"]) == 1 + len("Hello, world")
    assert out["ids"] == _greedy_reference(ckpts[fmt], out["prompt_ids"], 6)
    assert isinstance(out["text"], str)


def test_generate_batch_sampling_and_errors(ckpts: dict[str, Path], capsys) -> None:
    model = load_model(ckpts["fp8"])
    tok = load_tokenizer(model)
    a, b = encode(tok, "a longer prompt here", 0), encode(tok, "short", 0)
    batch = generate(model, tok, [a, b], 3)
    assert batch == [generate(model, tok, a, 3), generate(model, tok, b, 3)]
    s1, s2 = (generate(model, tok, a, 4, temperature=1.0, seed=s) for s in (3, 3))
    assert s1 == s2 and len(s1) == 4
    code, _, stderr = run_cli(
        capsys,
        "generate",
        "--model",
        ckpts["fp8"],
        "--prompt",
        "x",
        "--mtp",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert code in (0, 2)  # 2 with a one-line error until dsv3tools.evals.mtp exists
    if code == 2:
        assert "--mtp needs" in stderr
    code, _, stderr = run_cli(capsys, "generate", "--model", ckpts["fp8"] / "nope", "--prompt", "x")
    assert code == 2 and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1


def test_compare_cli(ckpts: dict[str, Path], capsys, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli(
        capsys, "compare", "--model", ckpts["fp8"], "--against", ckpts["bf16"], "--json"
    )
    assert code == 0, stderr
    same = json.loads(stdout)
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["max_abs_logit_diff"] == 0.0
    prompts = tmp_path / "p.txt"
    prompts.write_text('first prompt\n{"prompt": "second prompt"}\n')
    code, stdout, stderr = run_cli(
        capsys, "compare", "--model", ckpts["fp8"], "--against", ckpts["int4"], "--prompts", prompts, "--json"
    )
    assert code == 0, stderr
    q = json.loads(stdout)
    assert q["prompts"] == 2 and 0 < q["kl_mean"] <= q["kl_max"] < 1.0
    assert 0.5 <= q["top1_agreement"] < 1.0 or q["top1_agreement"] == 1.0


def test_logit_stats_against_direct_formula() -> None:
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = (pa * (pa.log() - pb.log())).sum(-1)
    s = logit_stats([a], [b])
    assert abs(s["kl_mean"] - float(kl.mean())) < 1e-5 and abs(s["kl_max"] - float(kl.max())) < 1e-5
    assert abs(s["top1_agreement"] - float((a.argmax(-1) == b.argmax(-1)).float().mean())) < 1e-6
