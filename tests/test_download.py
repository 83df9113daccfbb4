"""`dsv3tools download` against a local hub-compatible server (dsv3tools.hub.server): subsets,
byte identity, resume after a kill, verification and re-fetch, free-disk and unreachable-hub errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3tools.errors import DSV3Error
from dsv3tools.hub import download as dl
from dsv3tools.hub.server import HubServer

REPO = "deepseek-ai/DeepSeek-V3"
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic checkpoint cut into ~1 MB shards (8 shards, layers 0-2 + MTP layer 3)."""
    from dsv3tools.checkpoint.synth import synthesize

    out = tmp_path_factory.mktemp("hubrepo") / "DeepSeek-V3"
    synthesize(out, "tiny", seed=0, max_shard_bytes=1 << 20)
    return out


@pytest.fixture()
def hub(repo_dir: Path):
    with HubServer({REPO: repo_dir}) as server:
        yield server


def shards_with_layers(repo_dir: Path, lo: int, hi: int) -> set[str]:
    """Independent of the code under test: the shards holding a tensor of layers lo..hi."""
    wm = json.loads((repo_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = set()
    for name, shard in wm.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and lo <= int(m.group(1)) <= hi:
            out.add(shard)
    return out


def served_shards(hub: HubServer) -> set[str]:
    return {p for p, n in hub.bytes_served.items() if p.endswith(".safetensors") and n > 0}


def local_files(d: Path) -> set[str]:
    return {
        p.relative_to(d).as_posix()
        for p in d.rglob("*")
        if p.is_file() and not p.relative_to(d).as_posix().startswith(".")
    }


def same_bytes(a: Path, b: Path, names: set[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def cli_cmd() -> list[str]:
    if (ROOT / "dsv3tools" / "cli.py").exists() and (ROOT / "dsv3tools" / "__main__.py").exists():
        return [sys.executable, "-m", "dsv3tools", "download"]
    return [sys.executable, "-m", "dsv3tools.commands.download"]


def cli_env(endpoint: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DSV3TOOLS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli_cmd(), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ 1. subsets


def test_full_download_is_byte_identical(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dl"
    res = dl.download(REPO, local_dir=out, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", max_workers=4)
    assert not res.failed and local_files(out) == local_files(repo_dir)
    assert same_bytes(out, repo_dir, local_files(repo_dir))
    state = json.loads((out / ".dsv3tools" / "download.json").read_text())
    assert state["commit"] == hub.commits[REPO] and state["repo"] == REPO
    assert set(state["files"]) == local_files(repo_dir)


def test_include_mtp_fetches_only_the_mtp_shards(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((repo_dir / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    want = shards_with_layers(repo_dir, n, n + cfg["num_nextn_predict_layers"] - 1)
    assert 0 < len(want) < 8
    out = tmp_path / "dl"
    res = dl.download(
        REPO, local_dir=out, include=["mtp"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
    )
    assert not res.failed
    assert served_shards(hub) == want
    assert local_files(out) == want | SMALL
    assert same_bytes(out, repo_dir, want | SMALL)


def test_include_layers_and_union(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    want = shards_with_layers(repo_dir, 0, 1)
    assert 0 < len(want) < 8
    out = tmp_path / "dl"
    dl.download(
        REPO, local_dir=out, include=["layers:0-1"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
    )
    assert served_shards(hub) == want and local_files(out) == want | SMALL
    # several values union; already-present shards are not fetched again
    hub.reset_counts()
    union = want | shards_with_layers(repo_dir, 3, 3)
    dl.download(
        REPO,
        local_dir=out,
        include=["layers:0-1", "mtp"],
        endpoint=hub.endpoint,
        cache_dir=tmp_path / "cache",
    )
    assert local_files(out) == union | SMALL and served_shards(hub) == union - want
    p = dl.plan(REPO, local_dir=out, include=["config"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert {f.name for f in p.files} == SMALL and p.fetch == []


@pytest.mark.parametrize("bad", ["layers:3-1", "layers:0-99", "experts", "layers:x"])
def test_bad_include_is_a_one_line_error(hub: HubServer, tmp_path: Path, bad: str) -> None:
    with pytest.raises(DSV3Error, match="--include"):
        dl.plan(
            REPO,
            local_dir=tmp_path / "dl",
            include=[bad],
            endpoint=hub.endpoint,
            cache_dir=tmp_path / "cache",
        )


def test_dry_run_json_writes_nothing(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dl"
    r = run_cli(
        ["--local-dir", str(out), "--include", "mtp", "--dry-run", "--json"], cli_env(hub.endpoint, tmp_path)
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    names = {f["name"] for f in plan["files"]}
    assert names == shards_with_layers(repo_dir, 3, 3) | SMALL
    assert plan["file_count"] == len(names) and plan["fetch_bytes"] == sum(
        (repo_dir / n).stat().st_size for n in names
    )
    assert plan["commit"] == hub.commits[REPO]
    assert not out.exists() and served_shards(hub) == set()


# ------------------------------------------------------------------------------------------ 2. resume


def test_killed_download_resumes_without_refetching(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    out, env = tmp_path / "dl", cli_env(hub.endpoint, tmp_path)
    victim = "model-00008-of-000008.safetensors"
    size = (repo_dir / victim).stat().st_size
    hub.stall(victim, size // 2)
    others = local_files(repo_dir) - {victim}
    proc = subprocess.Popen([*cli_cmd(), "--local-dir", str(out), "--max-workers", "2"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (hub.bytes_served.get(victim) == size // 2 and local_files(out) >= others):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the download never reached the stalled file"
            time.sleep(0.05)
        time.sleep(0.3)  # let the state file catch up with the last finished file (it is optional for resume)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert victim not in local_files(out)  # no partial file under its final name
    hub.reset_counts()
    r = run_cli(["--local-dir", str(out), "--json"], env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["fetched"] == [victim] and set(report["skipped"]) == others
    assert {p for p, n in hub.bytes_served.items() if n} == {victim} and hub.bytes_served[victim] == size
    assert same_bytes(out, repo_dir, local_files(repo_dir))
    assert not list((out / ".cache").rglob("*.incomplete"))  # the killed run's partial file was cleaned up


# ------------------------------------------------------------------------------------ 3. verification


def test_corrupted_file_is_caught_and_fetched_again(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "dl", tmp_path / "cache"
    dl.download(REPO, local_dir=out, include=["layers:0-1"], endpoint=hub.endpoint, cache_dir=cache)
    shard = sorted(shards_with_layers(repo_dir, 0, 1))[0]
    path = out / shard
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a hash can tell
    p = dl.plan(REPO, local_dir=out, include=["layers:0-1"], endpoint=hub.endpoint, cache_dir=cache)
    report = dl.verify(p)
    assert set(report.failed) == {shard} and "sha256" in report.failed[shard]
    hub.reset_counts()
    res = dl.download(REPO, local_dir=out, include=["layers:0-1"], endpoint=hub.endpoint, cache_dir=cache)
    assert res.refetched == [shard] and not res.failed
    assert served_shards(hub) == {shard} and path.read_bytes() == (repo_dir / shard).read_bytes()
    assert not dl.verify(p).failed


def test_bad_transfer_is_refetched_in_the_same_run(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    shard = sorted(shards_with_layers(repo_dir, 0, 1))[0]
    hub.corrupt_once(shard)
    out = tmp_path / "dl"
    res = dl.download(
        REPO, local_dir=out, include=["layers:0-1"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
    )
    assert res.refetched == [shard] and not res.failed
    assert hub.bytes_served[shard] == 2 * (repo_dir / shard).stat().st_size
    assert (out / shard).read_bytes() == (repo_dir / shard).read_bytes()


def test_verify_only_cli_reports_corruption_exit_2(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dl"
    dl.download(REPO, local_dir=out, include=["mtp"], endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    (out / "tokenizer.json").write_text("{}")
    hub.reset_counts()
    r = run_cli(["--local-dir", str(out), "--verify-only", "--json"], cli_env(hub.endpoint, tmp_path))
    assert r.returncode == 2
    report = json.loads(r.stdout)
    assert set(report["failed"]) == {"tokenizer.json"} and len(report["skipped"]) == len(local_files(out)) - 1
    assert "tokenizer.json" in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert hub.total_bytes() == 0  # verify-only fetches nothing


# ----------------------------------------------------------------------------------- 4, 5. fail fast


def test_too_little_disk_exits_2_before_any_byte(hub: HubServer, tmp_path: Path) -> None:
    out = tmp_path / "dl"
    env = cli_env(hub.endpoint, tmp_path, DSV3TOOLS_FAKE_FREE_BYTES="1000")
    r = run_cli(["--local-dir", str(out)], env)
    assert r.returncode == 2, r.stderr
    assert (
        "need" in r.stderr and "free" in r.stderr and "1000 bytes" in r.stderr and "Traceback" not in r.stderr
    )
    assert served_shards(hub) == set() and not out.exists()


def test_unreachable_hub_exits_2_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = run_cli(
        ["--local-dir", str(tmp_path / "dl")], cli_env(f"http://127.0.0.1:{port}", tmp_path), timeout=60
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 2 and elapsed < 10, (elapsed, r.stderr)
    assert "cannot reach the hub" in r.stderr and str(port) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_complete_download_runs_the_gate(tmp_path: Path) -> None:
    """Files identical to the hub's can still form a broken checkpoint (here the index lists a tensor no
    shard holds): a download or --verify-only of the whole checkpoint runs the validation gate, exit 2."""
    from dsv3tools.checkpoint.synth import synthesize

    repo = tmp_path / "repo"
    synthesize(repo, "tiny", seed=0)
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = sorted(index["weight_map"].values())[0]
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    with HubServer({REPO: repo}) as hub:
        env = cli_env(hub.endpoint, tmp_path)
        out = tmp_path / "dl"
        for args in ([], ["--verify-only"]):
            r = run_cli(["--local-dir", str(out), "--json", *args], env)
            assert r.returncode == 2, r.stderr
            assert "model.layers.0.self_attn.extra.weight" in r.stderr and r.stderr.strip().count("\n") == 0
            assert "Traceback" not in r.stderr
        assert same_bytes(out, repo, local_files(repo))  # the files themselves are the hub's
