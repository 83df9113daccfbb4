"""Fetching the checkpoint from the Hub: plan (which files, how many bytes), execute (parallel,
resumable, through huggingface_hub), verify (size and LFS sha256 / git blob sha1 against the hub's
metadata, re-fetching what fails). No printing: the CLI (``dsv3tools.commands.download``) renders.

Subsets (``--include``) resolve through ``model.safetensors.index.json``: ``config`` = every
non-weight file; ``main`` = shards holding tensors outside layers >= num_hidden_layers;
``mtp`` = shards holding layers num_hidden_layers .. +num_nextn_predict_layers-1; ``layers:A-B``
= shards holding those layers; every weight subset adds ``config``. The commit used and the files
verified are recorded in ``LOCAL_DIR/.dsv3tools/download.json`` (which also lets a resumed run
skip re-hashing files it already verified).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from dsv3tools.checkpoint.fsutil import atomic_write_json, free_bytes
from dsv3tools.errors import DSV3Error
from dsv3tools.hub.select import DEFAULT_REPO, parse_include, select

STATE = ".dsv3tools/download.json"
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the resolved commit, as the hub describes it."""

    name: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (verifies non-LFS files)

    @property
    def expected(self) -> str:
        return self.sha256 or self.blob_id or f"size:{self.size}"


@dataclass
class Plan:
    """What a download will do; ``files`` are the selected files, ``fetch`` the ones not yet on disk."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    local_dir: Path
    include: list[str]
    files: list[RemoteFile]
    fetch: list[str]
    free_bytes: int
    token: str | bool | None = field(default=None, repr=False)
    cache_dir: Path | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def fetch_bytes(self) -> int:
        names = set(self.fetch)
        return sum(f.size for f in self.files if f.name in names)

    def to_dict(self) -> dict:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "local_dir": str(self.local_dir),
            "include": self.include,
            "file_count": len(self.files),
            "total_bytes": self.total_bytes,
            "fetch_count": len(self.fetch),
            "fetch_bytes": self.fetch_bytes,
            "free_bytes": self.free_bytes,
            "files": [{"name": f.name, "size": f.size, "fetch": f.name in self.fetch} for f in self.files],
        }


@dataclass
class Result:
    """Outcome of ``execute`` or ``verify``: per-file status and byte counts."""

    plan: Plan
    fetched: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    fetched_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = self.plan.to_dict()
        d.pop("files")
        d.update(
            fetched=self.fetched,
            refetched=self.refetched,
            skipped=self.skipped,
            failed=self.failed,
            fetched_bytes=self.fetched_bytes,
            seconds=round(self.seconds, 3),
            ok=not self.failed,
        )
        return d


@dataclass
class Progress:
    """Callbacks for a byte progress bar: ``add_total(n)`` when work is added, ``advance(n)`` per chunk."""

    add_total: Callable[[int], None] = lambda n: None
    advance: Callable[[int], None] = lambda n: None


# ----------------------------------------------------------------------------------------- hub access


def resolve_endpoint(endpoint: str | None) -> str:
    """Explicit endpoint, else ``HF_ENDPOINT``, else huggingface_hub's default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_error(exc: Exception, repo: str, revision: str, endpoint: str) -> DSV3Error:
    if isinstance(exc, RevisionNotFoundError):
        return DSV3Error(
            f"{repo}: revision {revision!r} not found at {endpoint}; pass an existing --revision"
        )
    if isinstance(exc, GatedRepoError):
        return DSV3Error(
            f"{repo}: gated repo; accept its terms on the hub and log in (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return DSV3Error(
            f"{repo}: repo not found at {endpoint}; check --repo, HF_ENDPOINT, or log in (HF_TOKEN)"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return DSV3Error(
            f"{repo}: HF_HUB_OFFLINE is set; unset it to download (or use --verify-only on a finished download)"
        )
    if isinstance(exc, HfHubHTTPError):
        return DSV3Error(
            f"{repo}: hub at {endpoint} answered {exc.response.status_code}; retry later or set HF_ENDPOINT to a mirror"
        )
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DSV3Error(
        f"cannot reach the hub at {endpoint} ({reason}); check the network, proxy or HF_ENDPOINT"
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the hub did not answer usefully", for whichever HTTP client is in use."""
    errs: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError, OSError]
    for mod, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errs.append(getattr(importlib.import_module(mod), attr))
    return tuple(errs)


_HUB_ERRORS = _network_errors()


def remote_files(
    repo: str, revision: str, endpoint: str, token: str | bool | None = None
) -> tuple[str, list[RemoteFile]]:
    """Resolve ``revision`` to a commit sha and list the repo's files with size and hashes."""
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, files_metadata=True, timeout=30
        )
    except _HUB_ERRORS as exc:
        raise _hub_error(exc, repo, revision, endpoint) from None
    if not info.sha or info.siblings is None:
        raise DSV3Error(
            f"{repo}: the hub at {endpoint} returned no commit or file list; check HF_ENDPOINT points to a hub"
        )
    files = []
    for s in info.siblings:
        sha = s.lfs.sha256 if s.lfs else None
        size = s.lfs.size if s.lfs else s.size
        files.append(RemoteFile(s.rfilename, int(size or 0), sha, s.blob_id))
    return info.sha, files


def fetch_json(
    repo: str, filename: str, commit: str, endpoint: str, token: str | bool | None, cache_dir: Path | None
) -> dict:
    """Read a small JSON file of the repo through the hub cache (a later local-dir download copies it from there)."""
    try:
        path = hf_hub_download(
            repo, filename, revision=commit, endpoint=endpoint, token=token, cache_dir=cache_dir
        )
    except _HUB_ERRORS as exc:
        raise _hub_error(exc, repo, commit, endpoint) from None
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise DSV3Error(
            f"{repo}/{filename}: not valid JSON at commit {commit}; the repo is not a usable checkpoint"
        ) from None


# ------------------------------------------------------------------------------------ state and checks


def read_state(local_dir: Path) -> dict:
    """The record of an earlier run in ``local_dir`` (empty dict if none or unreadable)."""
    try:
        return json.loads((Path(local_dir) / STATE).read_text())
    except (OSError, ValueError):
        return {}


class _State:
    """Thread-safe ``.dsv3tools/download.json`` writer; saved after every verified file."""

    def __init__(self, plan: Plan) -> None:
        old = read_state(plan.local_dir)
        self.files: dict[str, dict] = old.get("files", {}) if isinstance(old.get("files"), dict) else {}
        self.head = {
            "repo": plan.repo,
            "revision": plan.revision,
            "commit": plan.commit,
            "endpoint": plan.endpoint,
        }
        self.include = plan.include
        self.path = plan.local_dir / STATE
        self.lock = threading.Lock()

    def verified(self, rf: RemoteFile, path: Path) -> bool:
        """True when this exact file (size, mtime) was verified against the same expected hash."""
        e = self.files.get(rf.name)
        try:
            st = path.stat()
        except OSError:
            return False
        return (
            bool(e)
            and e.get("verified")
            and e.get("expected") == rf.expected
            and e.get("size") == st.st_size == rf.size
            and e.get("mtime_ns") == st.st_mtime_ns
        )

    def record(self, rf: RemoteFile, path: Path | None, ok: bool) -> None:
        with self.lock:
            if ok and path is not None:
                entry = asdict(rf) | {
                    "expected": rf.expected,
                    "mtime_ns": path.stat().st_mtime_ns,
                    "verified": True,
                }
                self.files[rf.name] = entry
            else:
                self.files.pop(rf.name, None)
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        obj = self.head | {
            "include": self.include,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": self.files,
        }
        atomic_write_json(self.path, obj)


def hash_file(path: Path, rf: RemoteFile, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 for LFS files, git blob sha1 otherwise (what the hub reports for each)."""
    h = hashlib.sha256() if rf.sha256 else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
            if on_bytes:
                on_bytes(len(block))
    return h.hexdigest()


def check_file(path: Path, rf: RemoteFile, on_bytes: Callable[[int], None] | None = None) -> str | None:
    """None when ``path`` matches the hub's size and hash; else the reason it does not."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != rf.size:
        return f"size {size} != {rf.size}"
    if not (rf.sha256 or rf.blob_id):
        return None
    got = hash_file(path, rf, on_bytes)
    want = rf.sha256 or rf.blob_id
    return None if got == want else f"{'sha256' if rf.sha256 else 'git sha1'} {got[:12]}… != {want[:12]}…"


def _free_at(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return free_bytes(p)


# ------------------------------------------------------------------------------------------- planning


def plan(
    repo: str = DEFAULT_REPO,
    revision: str = "main",
    local_dir: Path | str = "DeepSeek-V3",
    include: list[str] | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: Path | str | None = None,
    offline_ok: bool = False,
) -> Plan:
    """Resolve the revision, select the files for ``include`` and find which still need fetching.

    ``offline_ok`` (used by verify-only) falls back to the hashes recorded in the local folder when
    the hub cannot be reached.
    """
    local_dir, endpoint, inc = Path(local_dir), resolve_endpoint(endpoint), parse_include(include)
    try:
        commit, files = remote_files(repo, revision, endpoint, token)
    except DSV3Error:
        state = read_state(local_dir)
        if not (offline_ok and state.get("files")):
            raise
        commit = state.get("commit", "")
        files = [
            RemoteFile(e["name"], e["size"], e.get("sha256"), e.get("blob_id"))
            for e in state["files"].values()
        ]
        inc = ["all"]

    def load(name: str) -> dict:
        return fetch_json(repo, name, commit, endpoint, token, Path(cache_dir) if cache_dir else None)

    chosen = select(files, inc, load)
    fetch = [
        f.name
        for f in chosen
        if not ((local_dir / f.name).is_file() and (local_dir / f.name).stat().st_size == f.size)
    ]
    cache = Path(cache_dir) if cache_dir else None
    return Plan(
        repo, revision, commit, endpoint, local_dir, inc, chosen, fetch, _free_at(local_dir), token, cache
    )


def check_disk(p: Plan) -> None:
    """Raise before the first byte when the files still to fetch do not fit on the target disk."""
    if p.fetch_bytes > p.free_bytes:
        raise DSV3Error(
            f"{p.local_dir}: not enough disk space: need {_gb(p.fetch_bytes)} ({p.fetch_bytes} bytes), free {_gb(p.free_bytes)} "
            f"({p.free_bytes} bytes); free space, pick another --local-dir, or fetch a subset with --include"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------------------ execution


def _tqdm_class(progress: Progress, seen: list[int]) -> type:
    """A tqdm stand-in for huggingface_hub's per-file bar that forwards byte counts to ``progress``."""

    class _Bar:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            seen[0] += int(n or 0)
            progress.advance(int(n or 0))

        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_postfix_str(self, *args: object, **kwargs: object) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str
        close = refresh = __enter__

    return _Bar


class _Run:
    """One execution: shared plan, state, progress and result, with a lock for the result."""

    def __init__(self, p: Plan, progress: Progress) -> None:
        self.plan, self.progress, self.state = p, progress, _State(p)
        self.result = Result(p)
        self.lock = threading.Lock()

    def fetch(self, rf: RemoteFile) -> str | None:
        """Download one file through huggingface_hub; returns an error reason or None."""
        path, seen = self.plan.local_dir / rf.name, [0]
        try:
            hf_hub_download(
                self.plan.repo,
                rf.name,
                revision=self.plan.commit,
                local_dir=self.plan.local_dir,
                endpoint=self.plan.endpoint,
                token=self.plan.token,
                cache_dir=self.plan.cache_dir,
                force_download=path.exists(),
                tqdm_class=_tqdm_class(self.progress, seen),
            )
            reason = None
        except _HUB_ERRORS as exc:
            reason = str(_hub_error(exc, self.plan.repo, self.plan.commit, self.plan.endpoint))
        with self.lock:
            self.result.fetched_bytes += seen[0]
        if rf.size > seen[0]:  # copied from the hub cache, or failed part-way: keep the bar's total honest
            self.progress.advance(rf.size - seen[0])
        return reason

    def one(self, rf: RemoteFile) -> None:
        path = self.plan.local_dir / rf.name
        fresh = rf.name in self.plan.fetch
        if not fresh:
            if self.state.verified(rf, path) or check_file(path, rf) is None:
                self.state.record(rf, path, True)
                return self._note(self.result.skipped, rf.name)
            self.progress.add_total(rf.size)
        reason = "not fetched"
        for attempt in range(2):
            reason = self.fetch(rf) or check_file(path, rf)
            if reason is None:
                self.state.record(rf, path, True)
                return self._note(
                    self.result.refetched if (attempt or not fresh) else self.result.fetched, rf.name
                )
            if attempt == 0:
                self.progress.add_total(rf.size)
        self.state.record(rf, None, False)
        with self.lock:
            self.result.failed[rf.name] = reason

    def _note(self, bucket: list[str], name: str) -> None:
        with self.lock:
            bucket.append(name)


def execute(p: Plan, *, max_workers: int = 8, progress: Progress | None = None) -> Result:
    """Fetch what ``p`` lacks (in parallel), verify every selected file, re-fetch failures once."""
    if max_workers < 1:
        raise DSV3Error(f"--max-workers {max_workers}: must be at least 1")
    progress = progress or Progress()
    p.local_dir.mkdir(parents=True, exist_ok=True)
    run, t0 = _Run(p, progress), time.monotonic()
    run.state.save()
    progress.add_total(p.fetch_bytes)
    ordered = sorted(p.files, key=lambda f: -f.size)  # big files first keeps all workers busy to the end
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(run.one, ordered))
    run.result.seconds = time.monotonic() - t0
    for bucket in (run.result.fetched, run.result.refetched, run.result.skipped):
        bucket.sort()
    if not run.result.failed:
        _drop_stale_partials(p.local_dir, t0)
    return run.result


def _drop_stale_partials(local_dir: Path, before_monotonic: float) -> None:
    """Remove partial downloads huggingface_hub left behind when an earlier run was killed."""
    cutoff = time.time() - (time.monotonic() - before_monotonic)
    for tmp in (local_dir / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass


def verify(p: Plan, *, max_workers: int = 8, progress: Progress | None = None) -> Result:
    """Hash every selected file on disk against the hub's metadata; fetch nothing."""
    progress = progress or Progress()
    progress.add_total(sum(f.size for f in p.files))
    state, result, lock = _State(p), Result(p), threading.Lock()
    t0 = time.monotonic()

    def one(rf: RemoteFile) -> None:
        path = p.local_dir / rf.name
        reason = check_file(path, rf, progress.advance)
        if reason is not None and path.is_file() and path.stat().st_size != rf.size:
            progress.advance(rf.size)
        if p.local_dir.is_dir():
            state.record(rf, path if reason is None else None, reason is None)
        with lock:
            if reason is None:
                result.skipped.append(rf.name)
            else:
                result.failed[rf.name] = reason

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        list(pool.map(one, sorted(p.files, key=lambda f: -f.size)))
    result.skipped.sort()
    result.seconds = time.monotonic() - t0
    return result


def download(
    repo: str = DEFAULT_REPO,
    revision: str = "main",
    local_dir: Path | str = "DeepSeek-V3",
    include: list[str] | None = None,
    *,
    max_workers: int = 8,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
) -> Result:
    """plan + free-disk check + execute: the whole ``dsv3tools download`` without the CLI."""
    p = plan(repo, revision, local_dir, include, endpoint=endpoint, token=token, cache_dir=cache_dir)
    check_disk(p)
    return execute(p, max_workers=max_workers, progress=progress)
