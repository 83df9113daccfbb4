"""The trained tiny DeepSeek-V3 (trained once per cache key, shared across sessions through the cache):
real FP8 format, held-out loss against a unigram baseline, accuracy on the shipped task, MTP acceptance
against an untrained MTP module, losslessness of speculative decoding, and the router-bias balancing rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.evals.train_tiny import PINNED_ENV, REPORT, balance_router_bias, pack, trained_tiny, unigram_ce

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny ops: one thread is faster than two on shared cores


@pytest.fixture(scope="session")
def trained() -> Path:
    return trained_tiny(cache=True)


def test_checkpoint_is_real_fp8_format(trained: Path) -> None:
    ck = Checkpoint(trained)
    assert ck.problems() == []
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["num_nextn_predict_layers"] == 1
    mtp = cfg["num_hidden_layers"]
    assert ck.get(f"model.layers.{mtp}.mlp.experts.0.up_proj.weight").dtype == torch.float8_e4m3fn
    assert ck.get(f"model.layers.{mtp}.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert torch.equal(ck.get(f"model.layers.{mtp}.embed_tokens.weight"), ck.get("model.embed_tokens.weight"))
    assert (trained / "tokenizer.json").is_file()


def test_heldout_loss_far_below_unigram(trained: Path) -> None:
    r = json.loads((trained / REPORT).read_text())
    assert r["heldout_loss"] < 0.5 * r["unigram_loss"]
    assert r["heldout_mtp_loss"] < r["unigram_loss"]
    for loads in r["heldout_expert_loads"].values():  # bias balancing keeps every expert in use
        assert min(loads) > 0


def test_training_ran_on_the_pinned_code_paths(trained: Path) -> None:
    """The weights come from the child process with PINNED_ENV, not from this process's native kernels."""
    r = json.loads((trained / REPORT).read_text())
    assert r["mkl_cbwr"] == PINNED_ENV["MKL_CBWR"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert r["cpu_capability"] == "AVX2"


def test_task_accuracy_at_least_twice_chance(cli, trained: Path) -> None:
    r = cli("eval", "--model", trained, "--task", "tinyfacts", "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_samples"]["tinyfacts"] >= 50
    assert out["metrics"]["tinyfacts"]["acc"] >= 2 * 0.25


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_bench_trained_lossless_and_beats_untrained(cli, trained: Path, k: int) -> None:
    baseline = ["--untrained-baseline"] if k == 1 else []
    r = cli(
        "mtp-bench",
        "--model",
        trained,
        "--k",
        str(k),
        "--max-new-tokens",
        "16",
        *baseline,
        "--json",
        env=ONE_THREAD,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lossless"] is True and out["prompts"] >= 20
    if k == 1:
        assert out["tau"] == pytest.approx(1 + out["alpha"])
        assert out["alpha"] > out["alpha_untrained_mtp"] + 0.2
    else:
        assert out["per_position"][1] <= out["per_position"][0]


def test_balance_router_bias_rule() -> None:
    class Gate:
        e_score_correction_bias = torch.zeros(4)

    class Model:
        def __init__(self):
            self.gate = Gate()
            self.model = type("D", (), {"layers": {"1": type("B", (), {"mlp": self})()}})()
            self.reset = False

        def routing_counts(self):
            return {1: torch.tensor([10, 2, 4, 4])}

        def reset_routing(self):
            self.reset = True

    m = Model()
    balance_router_bias(m, 0.01)  # mean load 5: overloaded expert down, underloaded up
    assert torch.allclose(m.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert m.reset


def test_pack_and_unigram_baseline() -> None:
    seqs = pack(["ab", "c"], 3, 6, torch.Generator().manual_seed(0))
    assert seqs.shape == (3, 6) and (seqs[:, 0] == 0).all()
    text = {tuple(s.tolist()) for s in seqs}
    a, b, c, nl = 5 + ord("a"), 5 + ord("b"), 5 + ord("c"), 5 + ord("\n")
    assert text <= {(0, a, b, nl, c, nl), (0, c, nl, a, b, nl)}
    uniform = (torch.arange(9) % 8).repeat(4, 1)
    assert unigram_ce(uniform, uniform, 8) == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-3)
