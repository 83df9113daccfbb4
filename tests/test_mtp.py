"""MTP speculative decoding: acceptance bookkeeping against a scripted model whose draft errors are known,
and losslessness on the built-in forward (random tiny checkpoint; the trained one is in test_train_tiny)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsv3tools import load_model
from dsv3tools.evals.mtp import bench, greedy_generate, speculative_generate

V = 50


def nxt(t: int) -> int:
    """The scripted main model's greedy rule: the next token depends only on the current one."""
    return (7 * t + 3) % V


def bad_draft(t: int) -> bool:
    """Tokens after which the scripted MTP module drafts wrongly."""
    return t % 3 == 0


class Scripted:
    """Main model ``t -> nxt(t)``; MTP given token t_{i+1} drafts nxt(t_{i+1}) unless bad_draft(t_{i+1}).
    The "hidden state" carries the token so chained drafts continue from the previous draft."""

    config = SimpleNamespace(num_nextn_predict_layers=1)
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.forwards = 0

    def new_cache(self, batch: int, max_len: int):
        return None

    def _onehot(self, toks: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(toks, V).float()

    def __call__(self, ids, start_pos=0, cache=None, return_hidden=False):
        self.forwards += 1
        logits = self._onehot(ids.clone().apply_(nxt))
        return (logits, ids.float().unsqueeze(-1)) if return_hidden else logits

    def mtp_forward(self, hidden, next_ids, start_pos=0, cache=None):
        drafted = next_ids.clone().apply_(lambda t: (nxt(t) + 1) % V if bad_draft(t) else nxt(t))
        return self._onehot(drafted), drafted.float().unsqueeze(-1)


def scripted_reference(prompt_last: int, n: int, k: int) -> tuple[list[int], int, int, list[int]]:
    """Independent replay: tokens, verify steps, accepted drafts and acceptances per draft position."""
    toks, t = [], prompt_last
    t = nxt(t)
    toks.append(t)
    steps = 0
    per = [0] * k
    while len(toks) < n:
        steps += 1
        cur = t
        a = 0
        for i in range(k):  # chained drafts stay correct until the first bad one
            if bad_draft(cur):
                break
            cur = nxt(cur)
            a += 1
            per[i] += 1
        for _ in range(a + 1):
            t = nxt(t)
            toks.append(t)
    return toks[:n], steps, sum(per), per


@pytest.mark.parametrize("k", [1, 2, 3])
def test_acceptance_bookkeeping_on_scripted_model(k: int) -> None:
    for start in range(V):
        model = Scripted()
        out, st = speculative_generate(model, [1, start], 40, k)
        toks, steps, accepted, per = scripted_reference(start, 40, k)
        assert out == toks
        assert (st.steps, st.accepted, st.proposed, st.accepted_at) == (steps, accepted, k * steps, per)
        assert st.main_forwards == steps + 1 == model.forwards
        s = st.summary()
        assert s["tau"] == pytest.approx(1 + accepted / steps)
        if k == 1:
            assert s["tau"] == pytest.approx(1 + s["alpha"])


@pytest.fixture(scope="module")
def model(tiny_fp8: Path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny single-token forwards: one thread is faster than two on shared cores
    yield load_model(tiny_fp8, dtype=torch.float32)
    torch.set_num_threads(old)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[0] + [r.randrange(5, 261) for _ in range(r.randint(2, 10))] for _ in range(n)]


def test_greedy_generate_equals_full_recompute(model) -> None:
    p = prompts(1)[0]
    out, forwards = greedy_generate(model, p, 8)
    ids = list(p)
    for _ in range(8):  # no cache: recompute the whole sequence each step
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(p) :] and forwards == 8


@pytest.mark.parametrize("k", [1, 2])
def test_lossless_on_builtin_forward(model, k: int) -> None:
    r = bench(model, prompts(20), 12, k)
    assert r["lossless"] and r["prompts"] == 20
    assert len(r["per_position"]) == k and all(0 <= a <= 1 for a in r["per_position"])
    if k == 1:
        assert r["tau"] == pytest.approx(1 + r["alpha"])


def test_mtp_bench_cli(cli, tiny_fp8: Path, tmp_path: Path) -> None:
    pf = tmp_path / "p.txt"
    pf.write_text("hello\nup: a b c\n")
    r = cli(
        "mtp-bench",
        "--model",
        tiny_fp8,
        "--prompts",
        pf,
        "--max-new-tokens",
        "6",
        "--k",
        "2",
        "--json",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"k", "alpha", "tau", "per_position", "lossless", "forwards_per_token", "speedup_wall"} <= set(out)
    assert out["k"] == 2 and out["lossless"] is True
    bad = cli("mtp-bench", "--model", tiny_fp8, "--prompts", tmp_path / "missing.txt")
    assert bad.returncode == 2 and "--prompts" in bad.stderr
