"""A local, Hugging Face Hub-compatible HTTP server over a folder, for tests and benchmarks.

It owns just the endpoints huggingface_hub calls to download a model repo:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (repo info; ``?blobs=true``
  adds size, blobId and lfs {size, sha256, pointerSize} per sibling),
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (tree listing, used by ``snapshot_download``),
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``Range`` support and the headers the client
  needs: ``X-Repo-Commit``, ``ETag`` (the sha256 for LFS files, the git blob sha1 otherwise),
  ``Content-Length``, ``X-Linked-Size``/``X-Linked-Etag`` for LFS files.

It counts the body bytes it serves per file (``bytes_served``) and can stall a file part-way
(``stall``) so tests can kill a client in the middle of a download. Stdlib only; binds 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx", ".png")
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServedFile:
    """One file of a served repo with the metadata the hub reports for it."""

    path: str
    local: Path
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files only


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def scan_repo(root: Path, lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES) -> dict[str, ServedFile]:
    """Index every regular file under ``root`` (hidden folders skipped) with hub metadata."""
    files: dict[str, ServedFile] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")[:-1]):
            continue
        lfs = p.suffix in lfs_suffixes
        sha = _sha256(p) if lfs else None
        files[rel] = ServedFile(rel, p, p.stat().st_size, _git_blob_sha1(p), sha)
    return files


class HubServer:
    """Serve folders as hub model repos on ``http://127.0.0.1:<port>``; use as a context manager."""

    def __init__(self, repos: dict[str, Path], *, port: int = 0) -> None:
        self.repos = {rid: scan_repo(Path(root)) for rid, root in repos.items()}
        self.commits = {rid: self._commit_of(files) for rid, files in self.repos.items()}
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stalls: dict[str, tuple[int, threading.Event]] = {}
        self._corrupt: set[str] = set()
        self._held: list[threading.Event] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @staticmethod
    def _commit_of(files: dict[str, ServedFile]) -> str:
        h = hashlib.sha1()
        for f in files.values():
            h.update(f"{f.path}\0{f.blob_id}\0".encode())
        return h.hexdigest()

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for event in self._held:
            event.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stall(self, path: str, after_bytes: int) -> threading.Event:
        """Make the next GET of ``path`` pause after ``after_bytes`` body bytes until the event is set."""
        event = threading.Event()
        self._stalls[path] = (after_bytes, event)
        self._held.append(event)
        return event

    def corrupt_once(self, path: str) -> None:
        """Flip the first body byte of the next GET of ``path`` (a bad transfer)."""
        self._corrupt.add(path)

    def _take(self, path: str) -> tuple[tuple[int, threading.Event] | None, bool]:
        with self._lock:
            stall = self._stalls.pop(path, None)
            corrupt = path in self._corrupt
            self._corrupt.discard(path)
        return stall, corrupt

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()

    def total_bytes(self, suffix: str = "") -> int:
        with self._lock:
            return sum(n for p, n in self.bytes_served.items() if p.endswith(suffix))

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_served[path] += n

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def resolve_revision(self, repo_id: str, rev: str) -> str | None:
        commit = self.commits[repo_id]
        return commit if rev in ("main", commit) else None

    def find_repo(self, rest: str) -> tuple[str, str] | None:
        """Split ``owner/name/tail`` into (repo id, tail) for a served repo."""
        for rid in self.repos:
            if rest == rid or rest.startswith(rid + "/"):
                return rid, rest[len(rid) + 1 :]
        return None


def _sibling(f: ServedFile, blobs: bool) -> dict:
    entry: dict = {"rfilename": f.path}
    if blobs:
        entry.update(size=f.size, blobId=f.blob_id)
        if f.sha256:
            entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
    return entry


def _tree_entry(f: ServedFile) -> dict:
    entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
    if f.sha256:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub._log(self.command, path)
        try:
            if path.startswith("/api/models/"):
                self._api(path[len("/api/models/") :], query)
            else:
                self._resolve(path.lstrip("/"), head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _api(self, rest: str, query: dict[str, str]) -> None:
        found = self.hub.find_repo(rest)
        if found is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        rid, tail = found
        files = self.hub.repos[rid]
        if tail == "" or tail.startswith("revision/"):
            rev = tail[len("revision/") :] if tail else "main"
            commit = self.hub.resolve_revision(rid, rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            blobs = query.get("blobs", "").lower() == "true"
            siblings = [_sibling(f, blobs) for f in files.values()]
            return self._json(
                {"id": rid, "modelId": rid, "sha": commit, "private": False, "siblings": siblings}
            )
        if tail.startswith("tree/"):
            return self._tree(rid, tail[len("tree/") :], query)
        return self._error(404, "EntryNotFound", f"unknown api path {tail}")

    def _tree(self, rid: str, tail: str, query: dict[str, str]) -> None:
        rev, _, sub = tail.partition("/")
        if self.hub.resolve_revision(rid, rev) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        recursive = query.get("recursive", "").lower() == "true"
        out, dirs = [], set()
        for f in self.hub.repos[rid].values():
            if not f.path.startswith(prefix):
                continue
            inner = f.path[len(prefix) :]
            if recursive or "/" not in inner:
                out.append(_tree_entry(f))
            else:
                dirs.add(prefix + inner.split("/")[0])
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._json(out)

    def _resolve(self, rest: str, head: bool) -> None:
        found = self.hub.find_repo(rest)
        if found is None or not found[1].startswith("resolve/"):
            return self._error(404, "RepoNotFound", "Repository not found")
        rid, tail = found
        rev, _, filename = tail[len("resolve/") :].partition("/")
        commit = self.hub.resolve_revision(rid, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        f = self.hub.repos[rid].get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", commit)
        start, end = self._range(f.size)
        if start is None:
            return self._error(416, "RangeNotSatisfiable", "bad range", commit)
        self.send_response(206 if (start, end) != (0, f.size - 1) and self.headers.get("Range") else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{f.sha256 or f.blob_id}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if f.sha256:
            self.send_header("X-Linked-Size", str(f.size))
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        self.end_headers()
        if not head:
            self._send_body(f, start, end)

    def _range(self, size: int) -> tuple[int | None, int]:
        header = self.headers.get("Range")
        if not header or not header.startswith("bytes="):
            return 0, size - 1
        first, _, last = header[len("bytes=") :].split(",")[0].partition("-")
        try:
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), min(size - 1, int(last)) if last else size - 1
        except ValueError:
            return None, 0
        return (start, end) if start < size or size == 0 else (None, 0)

    def _send_body(self, f: ServedFile, start: int, end: int) -> None:
        stall, corrupt = self.hub._take(f.path)
        stall_at, event = stall if stall else (None, None)
        pos = start
        with open(f.local, "rb") as fh:
            fh.seek(start)
            while pos <= end:
                n = min(CHUNK, end - pos + 1)
                if stall_at is not None and event is not None and pos < stall_at:
                    n = min(n, stall_at - pos)
                block = fh.read(n)
                if not block:
                    break
                if corrupt:
                    block, corrupt = bytes([block[0] ^ 0xFF]) + block[1:], False
                self.wfile.write(block)
                self.hub._count(f.path, len(block))
                pos += len(block)
                if stall_at is not None and event is not None and pos == stall_at:
                    self.wfile.flush()
                    event.wait(60)
