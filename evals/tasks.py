"""Task plumbing for ``dsv3tools eval``: the shipped local tasks, MMLU from a local cais/mmlu snapshot,
the fast offline check, and the ``lm_eval.simple_evaluate`` call.

MMLU from ``--mmlu-dir``: the snapshot has the cais/mmlu repository layout (one folder per subject
holding ``test-00000-of-00001.parquet``, ``validation-...``, ``dev-...``). For every subject present we
write a task YAML that is lm-eval's own built-in MMLU config (``lm_eval/tasks/mmlu/default``: its prompt
template, description, few-shot split and sampler) with only the dataset source replaced by the local
parquet files, plus lm-eval's own group YAMLs restricted to the subjects present, so prompts and the
aggregation are exactly lm-eval's built-in ``mmlu``.
"""

from __future__ import annotations

import os
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dsv3tools.errors import DSV3Error

MMLU_FEWSHOT = 5  # the setting DeepSeek-V3 reports
MMLU_SPLITS = ("test", "validation", "dev")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0
MMLU_HINT = (
    "download a snapshot where the hub is reachable (`hf download cais/mmlu --repo-type dataset "
    "--local-dir DIR`) and pass `--mmlu-dir DIR` (per-subject folders, e.g. DIR/abstract_algebra/"
    "test-00000-of-00001.parquet)"
)


def data_dir() -> Path:
    """The shipped task data (``evals/data``)."""
    return Path(str(resources.files("dsv3tools.evals") / "data"))


def write_local_tasks(out_dir: str | Path) -> Path:
    """Render every shipped ``*.yaml.template`` with absolute data paths into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = data_dir().resolve()
    for tpl in sorted(root.glob("*/*.yaml.template")):
        text = tpl.read_text().format(data_dir=root.as_posix())
        (out / tpl.name.removesuffix(".template")).write_text(text)
    return out


def hub_offline_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub is unusable (an offline env var, or no TCP connection within ``timeout``)."""
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = [f"no connection to {host}:{port} within {timeout:.0f} s"]

    def probe() -> None:  # DNS lookups ignore socket timeouts, so the whole probe runs in a thread
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = f"cannot reach {host}:{port} ({e})"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0]


def _mmlu_config_dir() -> Path:
    return Path(str(resources.files("lm_eval") / "tasks" / "mmlu" / "default"))


def _load_yaml(path: Path) -> dict:
    """An lm-eval YAML with its ``include`` chain merged (local keys win)."""
    cfg = yaml.safe_load(path.read_text())
    inc = cfg.pop("include", None)
    if inc is None:
        return cfg
    return {**_load_yaml(path.parent / inc), **cfg}


def mmlu_subjects(mmlu_dir: str | Path) -> list[str]:
    """Subjects of lm-eval's MMLU that have a test split in the snapshot."""
    root = Path(mmlu_dir)
    if not root.is_dir():
        raise DSV3Error(f"--mmlu-dir {root}: not a folder; {MMLU_HINT}")
    known = sorted(p.stem.removeprefix("mmlu_") for p in _mmlu_config_dir().glob("mmlu_*.yaml"))
    found = [s for s in known if any((root / s).glob("test-*.parquet"))]
    if not found:
        raise DSV3Error(
            f"--mmlu-dir {root}: no <subject>/test-*.parquet files (cais/mmlu layout); {MMLU_HINT}"
        )
    return found


def write_mmlu_tasks(mmlu_dir: str | Path, out_dir: str | Path) -> list[str]:
    """lm-eval's built-in MMLU task/group YAMLs over the local snapshot, written into ``out_dir``."""
    root, out = Path(mmlu_dir).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = mmlu_subjects(root)
    src = _mmlu_config_dir()
    tags: set[str] = set()
    for s in subjects:
        cfg = _load_yaml(src / f"mmlu_{s}.yaml")
        files = {sp: sorted(str(p) for p in (root / s).glob(f"{sp}-*.parquet")) for sp in MMLU_SPLITS}
        if not files["dev"]:
            raise DSV3Error(f"--mmlu-dir {root}: {s} has no dev-*.parquet (the few-shot split); {MMLU_HINT}")
        cfg.pop("dataset_name", None)
        cfg["dataset_path"] = "parquet"
        cfg["dataset_kwargs"] = {"data_files": {sp: f for sp, f in files.items() if f}}
        tags.update([cfg["tag"]] if isinstance(cfg.get("tag"), str) else cfg.get("tag", []))
        (out / f"mmlu_{s}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    groups = []
    for g in sorted(src.glob("_mmlu_*.yaml")):
        cfg = yaml.safe_load(g.read_text())
        cfg["task"] = [t for t in cfg["task"] if t in tags]
        if cfg["task"]:
            groups.append(cfg["group"])
            (out / g.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    top = yaml.safe_load((src / "_mmlu.yaml").read_text())
    top["task"] = [t for t in top["task"] if t in groups]
    (out / "_mmlu.yaml").write_text(yaml.safe_dump(top, sort_keys=False))
    return subjects


def prepare_tasks(
    task: str, workdir: str | Path, tasks_dir: str | Path | None = None, mmlu_dir: str | Path | None = None
):
    """A ``TaskManager`` that knows ``task`` (checks data availability first; raises :class:`DSV3Error`)."""
    is_mmlu = task == "mmlu" or task.startswith("mmlu_")
    if is_mmlu and mmlu_dir is None:
        reason = hub_offline_reason()
        if reason:
            raise DSV3Error(
                f"--task {task} needs cais/mmlu from the Hugging Face hub, which is unusable ({reason}); {MMLU_HINT}"
            )
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise DSV3Error(f"--tasks-dir {tasks_dir}: not a folder of lm-eval task YAMLs")
    from lm_eval.tasks import TaskManager

    work = Path(workdir)
    include = [str(write_local_tasks(work / "local"))]
    if tasks_dir is not None:
        include.append(str(Path(tasks_dir).resolve()))
    if is_mmlu and mmlu_dir is not None:
        write_mmlu_tasks(mmlu_dir, work / "mmlu")
        include.append(str(work / "mmlu"))
    tm = TaskManager(include_path=include, include_defaults=False)
    if task in tm.all_tasks:
        return tm
    if mmlu_dir is not None and is_mmlu:
        raise DSV3Error(f"--task {task}: that subject is not in --mmlu-dir {mmlu_dir}")
    reason = hub_offline_reason()
    if reason:
        raise DSV3Error(
            f"--task {task}: not a local task and the hub is unusable ({reason}); pass --tasks-dir DIR"
        )
    tm = TaskManager(include_path=include, include_defaults=True)
    if task not in tm.all_tasks:
        raise DSV3Error(f"--task {task}: unknown task; use mmlu, tinyfacts, or a task from --tasks-dir")
    return tm


def run_eval(
    lm: Any,
    task: str,
    task_manager: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
) -> dict:
    """``lm_eval.simple_evaluate`` on one task or group (MMLU defaults to 5-shot); lm-eval's result dict."""
    import lm_eval

    if num_fewshot is None and (task == "mmlu" or task.startswith("mmlu_")):
        num_fewshot = MMLU_FEWSHOT
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def summarize(results: dict) -> dict:
    """The metrics of every task and group in lm-eval's results (``acc``, ``acc_norm`` ...), JSON-ready."""
    out: dict[str, dict] = {}
    for section in ("results", "groups"):
        for name, metrics in (results.get(section) or {}).items():
            vals = {
                k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k
            }
            out.setdefault(name, {}).update(vals)
    n = {k: v.get("effective", v.get("original")) for k, v in (results.get("n-samples") or {}).items()}
    return {"metrics": out, "n_samples": n, "n_shot": results.get("n-shot", {})}
