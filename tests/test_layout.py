"""The shape of the tree (SPEC sec. 1): no import cycles among the project's own modules, small modules,
the folder rule at the package root, and a CLI that keeps every command and option it ever offered."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer

from tests.conftest import ROOT

# source folder -> the package it installs as (pyproject's package-dir mapping)
SOURCE_ROOTS = {
    "dsv3tools": "dsv3tools",
    "converters": "dsv3tools.converters",
    "kernels": "dsv3tools.kernels",
    "evals": "dsv3tools.evals",
}
MAX_LINES = 600
ROOT_MODULES = {"__init__.py", "__main__.py", "cli.py", "config.py", "errors.py"}

# every command and its options as of the layout change; later changes may add, never remove
CLI_OPTIONS = {
    "compare": ["--against", "--device", "--json", "--model", "--offload", "--prompts"],
    "convert": [
        "--dry-run",
        "--group-size",
        "--int4-method",
        "--int4-scope",
        "--json",
        "--model",
        "--out",
        "--part",
        "--report",
        "--scale-fmt",
        "--to",
        "--workers",
    ],
    "demo": ["--json", "--workdir"],
    "download": [
        "--dry-run",
        "--include",
        "--json",
        "--local-dir",
        "--max-workers",
        "--repo",
        "--revision",
        "--verify-only",
    ],
    "eval": [
        "--batch-size",
        "--dtype",
        "--json",
        "--limit",
        "--mmlu-dir",
        "--model",
        "--num-fewshot",
        "--output",
        "--task",
        "--tasks-dir",
    ],
    "expert-load": ["--device", "--json", "--max-tokens", "--model", "--out", "--prompts"],
    "generate": [
        "--device",
        "--json",
        "--k",
        "--max-new-tokens",
        "--model",
        "--mtp",
        "--offload",
        "--prompt",
        "--seed",
        "--temperature",
    ],
    "inspect": ["--json", "--model"],
    "merge-mtp": ["--dry-run", "--json", "--main", "--mtp", "--out"],
    "mtp-bench": [
        "--dtype",
        "--json",
        "--k",
        "--max-new-tokens",
        "--model",
        "--prompts",
        "--untrained-baseline",
    ],
    "reshard": [
        "--dry-run",
        "--expert-load",
        "--format",
        "--gpus",
        "--json",
        "--model",
        "--no-mtp",
        "--nodes",
        "--out",
        "--policy",
        "--redundant-experts",
        "--workers",
    ],
    "split-mtp": ["--dry-run", "--json", "--model", "--out"],
    "synth": ["--dtype", "--experts", "--json", "--layers", "--out", "--preset", "--seed", "--sparse"],
}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file, for every module of the four source folders."""
    mods: dict[str, Path] = {}
    for folder, package in SOURCE_ROOTS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "dsv3tools" and parts and parts[0] in ("converters", "kernels", "evals"):
                continue  # not a source of those packages (they live at the top level)
            mods[".".join([package, *parts])] = path
    return mods


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (inside functions too). ``from P
    import name`` counts as an import of ``P.name`` when that is a module, else of ``P``."""
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, mod, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "dsv3tools"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "transformer.py").write_text("def f():\n    from dsv3tools.model.loading import g\n")
    (pkg / "model" / "loading.py").write_text("from .transformer import f\n")
    (pkg / "model" / "other.py").write_text("from dsv3tools.model import loading\n")
    mods = project_modules(tmp_path)
    graph = import_graph(mods)
    assert graph["dsv3tools.model.other"] == {"dsv3tools.model.loading"}
    assert cycles(graph) == [["dsv3tools.model.loading", "dsv3tools.model.transformer"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph(project_modules()))
    assert found == [], f"import cycles: {found}"


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in project_modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_package_root_holds_only_the_entry_points_and_capability_folders() -> None:
    base = ROOT / "dsv3tools"
    files = {p.name for p in base.glob("*.py")}
    assert files == ROOT_MODULES
    for folder in (p for p in base.iterdir() if p.is_dir() and p.name != "__pycache__" and p.name != "data"):
        assert (folder / "__init__.py").is_file(), f"{folder} is not a package"
        prefixed = [p.name for p in folder.glob(f"{folder.name}_*.py")]
        assert prefixed == [], f"{folder}: file names repeat the folder name: {prefixed}"


def test_every_command_keeps_its_options() -> None:
    from dsv3tools.cli import app

    group = typer.main.get_command(app)
    have = {
        name: {o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        for name, cmd in group.commands.items()
    }
    assert sorted(have) == sorted(CLI_OPTIONS)
    for name, opts in CLI_OPTIONS.items():
        assert set(opts) <= have[name], f"{name} lost {sorted(set(opts) - have[name])}"


@pytest.mark.parametrize("command", sorted(CLI_OPTIONS))
def test_help_lists_each_command(command: str) -> None:
    from typer.testing import CliRunner

    from dsv3tools.cli import app

    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    assert command in res.output
