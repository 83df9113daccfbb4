"""The generated training corpus of the trained tiny model and its held-out multiple-choice task.

Everything is a deterministic function of a seed. Three kinds of text, each with held-out questions:

- ``letters``: alphabet runs forward ("up: c d e f g") and backward ("down: k j i h"); a question is a
  run prefix whose (direction, start) never starts a training run, so the exact sentence is unseen and
  the answer follows from the letter successor/predecessor learned from other runs.
- ``numbers``: "after 37 comes 38." for 0..198; the held-out numbers never appear as "after N".
- ``facts``: an invented creature has a colour ("the zib is red.", "my zib is red.", "a red zib.");
  questions ask "your zib is" (a template that never occurs in training).

Questions are 4-way multiple choice (chance 25%) scored as loglikelihood of " " + choice.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes of the generated corpus and task (every field feeds the cache key of the trained model)."""

    seed: int = 1234
    n_creatures: int = 40
    n_letter_questions: int = 20
    n_number_questions: int = 20
    n_fact_questions: int = 20
    max_number: int = 199
    run_min: int = 4
    run_max: int = 9


def creatures(cfg: CorpusConfig) -> dict[str, str]:
    """Invented creature names (CVC syllables, unique) -> colour."""
    rng = random.Random(cfg.seed)
    names: dict[str, str] = {}
    while len(names) < cfg.n_creatures:
        name = rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(ONSETS)
        if name not in names:
            names[name] = rng.choice(COLOURS)
    return names


def _letter_heldout(cfg: CorpusConfig) -> list[tuple[str, int]]:
    """(direction, start index) pairs reserved for questions: no training run starts there."""
    rng = random.Random(cfg.seed + 1)
    pairs = [("up", i) for i in range(1, 23)] + [("down", i) for i in range(3, 25)]
    return rng.sample(pairs, cfg.n_letter_questions)


def _number_heldout(cfg: CorpusConfig) -> list[int]:
    rng = random.Random(cfg.seed + 2)
    return rng.sample(range(10, cfg.max_number - 1), cfg.n_number_questions)


def _run(direction: str, start: int, length: int) -> list[str]:
    step = 1 if direction == "up" else -1
    return [LETTERS[start + step * i] for i in range(length)]


def _letter_lines(rng: random.Random, cfg: CorpusConfig, n: int, heldout: set) -> list[str]:
    out = []
    while len(out) < n:
        direction = rng.choice(["up", "down"])
        length = rng.randint(cfg.run_min, cfg.run_max)
        start = rng.randrange(0, 26 - length + 1) if direction == "up" else rng.randrange(length - 1, 26)
        if (direction, start) in heldout:
            continue
        out.append(f"{direction}: " + " ".join(_run(direction, start, length)))
    return out


def _fact_line(rng: random.Random, name: str, colour: str) -> str:
    return rng.choice([f"the {name} is {colour}.", f"my {name} is {colour}.", f"a {colour} {name}."])


def sample_lines(cfg: CorpusConfig, n: int, seed: int) -> list[str]:
    """``n`` training-style lines drawn with ``seed`` (different seeds give held-out text of the same kind)."""
    rng = random.Random(seed)
    heldout_letters = set(_letter_heldout(cfg))
    heldout_numbers = set(_number_heldout(cfg))
    facts = list(creatures(cfg).items())
    numbers = [k for k in range(cfg.max_number) if k not in heldout_numbers]
    lines: list[str] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            lines += _letter_lines(rng, cfg, 1, heldout_letters)
        elif kind < 0.7:
            k = rng.choice(numbers)
            lines.append(f"after {k} comes {k + 1}.")
        else:
            lines.append(_fact_line(rng, *rng.choice(facts)))
    return lines


def _distinct(rng: random.Random, answer: str, pool: list[str], n: int = 3) -> list[str]:
    return rng.sample([p for p in dict.fromkeys(pool) if p != answer], n)


def _choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def questions(cfg: CorpusConfig) -> list[dict]:
    """The held-out multiple-choice questions: ``{"id", "kind", "prompt", "choices", "answer"}``."""
    rng = random.Random(cfg.seed + 3)
    out: list[dict] = []
    for direction, start in _letter_heldout(cfg):
        room = start + 1 if direction == "down" else 26 - start
        length = rng.randint(3, min(5, room - 1))
        run = _run(direction, start, length + 1)
        ans = run[-1]
        near = [LETTERS[(LETTERS.index(ans) + d) % 26] for d in (1, 2, 3, -1, -2, -3, 4, -4)]
        ch, idx = _choices(rng, ans, _distinct(rng, ans, [x for x in near if x not in run]))
        out.append(
            {"kind": "letters", "prompt": f"{direction}: " + " ".join(run[:-1]), "choices": ch, "answer": idx}
        )
    for k in _number_heldout(cfg):
        ans = str(k + 1)
        pool = [str(k + 2), str(k), str(k + 11), str(k - 9), str(k + 3)]
        ch, idx = _choices(rng, ans, _distinct(rng, ans, pool))
        out.append({"kind": "numbers", "prompt": f"after {k} comes", "choices": ch, "answer": idx})
    facts = list(creatures(cfg).items())
    for name, colour in rng.sample(facts, cfg.n_fact_questions):
        ch, idx = _choices(rng, colour, _distinct(rng, colour, COLOURS))
        out.append({"kind": "facts", "prompt": f"your {name} is", "choices": ch, "answer": idx})
    return [dict(q, id=i) for i, q in enumerate(out)]


def write_questions(path: str | Path, cfg: CorpusConfig) -> Path:
    """Write the questions as JSON lines (the shipped ``evals/data/tinyfacts/test.jsonl`` is this output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(q, sort_keys=True) + "\n" for q in questions(cfg)))
    return path
