"""lm-eval adapter: parity with lm-eval's HFLM on transformers' DeepseekV3ForCausalLM, the shipped task,
MMLU from a local cais/mmlu-layout snapshot (prompts equal lm-eval's built-in MMLU), and the offline
fast failure."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dsv3tools import load_model
from dsv3tools.evals.corpus import CorpusConfig, questions, sample_lines
from dsv3tools.evals.lm import DSV3LM
from dsv3tools.evals.tasks import data_dir, prepare_tasks, run_eval

PARITY_QUESTIONS = 24  # transformers' MoE is slow on CPU; the issue asks for at least 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_shipped_task_is_the_generated_heldout_questions() -> None:
    shipped = [
        json.loads(line) for line in (data_dir() / "tinyfacts" / "test.jsonl").read_text().splitlines()
    ]
    assert shipped == questions(CorpusConfig())
    assert len(shipped) >= 50 and all(len(q["choices"]) == 4 for q in shipped)
    train = sample_lines(CorpusConfig(), 20000, seed=CorpusConfig().seed + 100)
    text = "\n".join(train)
    for q in shipped:
        full = f"{q['prompt']} {q['choices'][q['answer']]}"
        assert not any(line.startswith(full) for line in train), full  # the exact sentence is never trained
    assert "your " not in text  # the fact questions use a template the corpus never shows


# ---- parity with lm-eval's own HFLM -------------------------------------------------------------------
def _samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_match_hflm_on_transformers(tiny_bf16: Path, tmp_path: Path) -> None:
    """Same weights: our adapter on the built-in forward vs lm-eval's HFLM on transformers' model."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    hf_model = DeepseekV3ForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tiny_bf16, add_bos_token=True)
    hflm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=8, max_length=512)
    ours = DSV3LM(model=load_model(tiny_bf16, dtype=torch.float32), batch_size=8)
    tm = prepare_tasks("tinyfacts", tmp_path)
    ref = run_eval(hflm, "tinyfacts", tm, limit=PARITY_QUESTIONS, log_samples=True)
    got = run_eval(ours, "tinyfacts", tm, limit=PARITY_QUESTIONS, log_samples=True)
    rs, gs = _samples(ref, "tinyfacts"), _samples(got, "tinyfacts")
    assert len(gs) == len(rs) >= 20
    n_req = 0
    for r, g in zip(rs, gs, strict=True):
        assert g["arguments"] == r["arguments"]
        for (lr, _), (lg, _) in zip(r["filtered_resps"], g["filtered_resps"], strict=True):
            assert abs(float(lr) - float(lg)) <= 1e-4
            n_req += 1
    assert n_req == 4 * len(rs)
    assert got["results"]["tinyfacts"]["acc,none"] == ref["results"]["tinyfacts"]["acc,none"]
    assert ours.tok_encode("ab") == hf_tok.encode("ab")  # BOS prepended like HFLM


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(tiny_fp8: Path) -> None:
    from lm_eval.api.instance import Instance

    model = load_model(tiny_fp8, dtype=torch.float32)
    lm = DSV3LM(model=model, max_length=16)  # forces several rolling windows
    text = "after 41 comes 42. the zib is red."
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (got,) = lm.loglikelihood_rolling([req])
    ids = [0, *lm.tok_encode(text, add_special_tokens=False)]
    ref, pos = 0.0, 1
    while pos < len(ids):  # independent: disjoint windows of max_length predictions, full left context
        end = min(pos + 16, len(ids))
        ctx = ids[max(0, end - 17) : end]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx[:-1]])).float(), -1)[0]
        tgt = torch.tensor(ctx[1:])
        ref += float(lp.gather(1, tgt[:, None]).squeeze(1)[-(end - pos) :].sum())
        pos = end
    assert abs(got - ref) < 1e-3


def test_generate_until_is_greedy_and_stops(tiny_fp8: Path) -> None:
    from lm_eval.api.instance import Instance

    model = load_model(tiny_fp8, dtype=torch.float32)
    lm = DSV3LM(model=model)
    ctx = "up: a b c"
    ids = lm.tok_encode(ctx)
    for _ in range(6):  # independent greedy decode without a cache
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    full = lm.tok_decode(ids[len(lm.tok_encode(ctx)) :])
    (got,) = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 6}), 0)])
    assert got == full
    stop = full[2:4] if len(full) >= 4 else None
    if stop:
        (cut,) = lm.generate_until(
            [Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 6}), 0)]
        )
        assert cut == full.split(stop)[0]


# ---- MMLU from a local snapshot ------------------------------------------------------------------------
SUBJECTS = {"abstract_algebra": "abstract algebra", "college_biology": "college biology"}


def write_snapshot(root: Path) -> dict:
    """A small snapshot in the cais/mmlu layout: <subject>/{test,validation,dev}-00000-of-00001.parquet."""
    data = {}
    for s in SUBJECTS:
        for split, n in (("test", 4), ("validation", 2), ("dev", 5)):
            rows = [
                {
                    "question": f" {s} {split} question {i}? ",
                    "subject": s,
                    "choices": [f"opt{i}a", f"opt{i}b", f"opt{i}c", f"opt{i}d"],
                    "answer": (i + len(split)) % 4,
                }
                for i in range(n)
            ]
            (root / s).mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(root / s / f"{split}-00000-of-00001.parquet", index=False)
            data[(s, split)] = rows
    return data


def expected_prompt(subject: str, shots: list[dict], doc: dict) -> str:
    """lm-eval's built-in MMLU prompt, written out by hand: description, 5 dev shots, the question."""

    def fmt(d: dict) -> str:
        c = d["choices"]
        return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    head = f"The following are multiple choice questions (with answers) about {SUBJECTS[subject]}.\n\n"
    body = "".join(f"{fmt(d)} {'ABCD'[d['answer']]}\n\n" for d in shots)
    return head + body + fmt(doc)


class RecordingLM(DSV3LM):
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.seen = [r.args for r in requests]
        return super().loglikelihood(requests, disable_tqdm)


def test_mmlu_prompts_match_lm_eval_builtin(tiny_fp8: Path, tmp_path: Path, monkeypatch) -> None:
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    data = write_snapshot(tmp_path / "mmlu")
    tm = prepare_tasks("mmlu", tmp_path / "work", mmlu_dir=tmp_path / "mmlu")
    lm = RecordingLM(model=load_model(tiny_fp8, dtype=torch.float32))
    res = run_eval(lm, "mmlu", tm)
    assert res["n-shot"]["mmlu_abstract_algebra"] == 5
    expected = set()
    for s in SUBJECTS:
        for doc in data[(s, "test")]:
            ctx = expected_prompt(s, data[(s, "dev")], doc)
            expected.update((ctx, f" {letter}") for letter in "ABCD")
    assert set(lm.seen) == expected
    assert "mmlu" in res["groups"] and set(res["results"]) >= {f"mmlu_{s}" for s in SUBJECTS}


def test_eval_mmlu_cli_offline_snapshot(cli, tiny_fp8: Path, tmp_path: Path) -> None:
    write_snapshot(tmp_path / "mmlu")
    out = tmp_path / "results.json"
    r = cli(
        "eval",
        "--model",
        tiny_fp8,
        "--task",
        "mmlu",
        "--mmlu-dir",
        tmp_path / "mmlu",
        "--limit",
        "2",
        "--output",
        out,
        "--json",
        env=OFFLINE,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_fewshot"] == 5 and 0.0 <= summary["metrics"]["mmlu"]["acc"] <= 1.0
    full = json.loads(out.read_text())  # lm-eval's own results JSON
    assert full["n-shot"]["mmlu_college_biology"] == 5 and "mmlu" in full["groups"]
    assert summary["n_samples"]["mmlu_abstract_algebra"] == 2


@pytest.mark.parametrize("env", [OFFLINE, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["env", "probe"])
def test_eval_mmlu_offline_fails_fast(cli, tiny_fp8: Path, env: dict) -> None:
    clean = {
        k: "" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ
    }
    t0 = time.monotonic()
    r = cli("eval", "--model", tiny_fp8, "--task", "mmlu", env={**clean, **env})
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "--mmlu-dir" in r.stderr and "cais/mmlu" in r.stderr and "Traceback" not in r.stderr
    assert elapsed < 10  # the acceptance criterion: fail within 10 s


def test_eval_local_tasks_dir(cli, tiny_fp8: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"q": f"q{i}", "choices": ["x", "y"], "a": i % 2}) + "\n" for i in range(6))
    )
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    (tdir / "mine.yaml").write_text(
        "task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {docs}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: a\nmetric_list:\n  - metric: acc\n"
    )
    r = cli("eval", "--model", tiny_fp8, "--task", "mytask", "--tasks-dir", tdir, "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_samples"]["mytask"] == 6 and 0 <= out["metrics"]["mytask"]["acc"] <= 1
    bad = cli("eval", "--model", tiny_fp8, "--task", "nosuchtask", env=OFFLINE)
    assert bad.returncode == 2 and "nosuchtask" in bad.stderr
