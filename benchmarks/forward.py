"""Forward benchmarks (run by hand; results in benchmarks/RESULTS.md).

    python benchmarks/forward.py [--workdir DIR] [--dtype float32|bfloat16] [--prompt-len 256] [--decode 32]
        [--runs 3] [--threads N] [--ours-in-place]
    python benchmarks/forward.py --offload-check [--layers 2 --experts 8] [--offload-tokens 16]

Default: the ``small`` preset (fp8 and its bf16 conversion, same weights), prefill and decode tokens/s of
the built-in forward (``load_model(..., materialize=True, attn_impl="auto")``: weights converted once at
load into the compute dtype, as transformers holds them) against transformers' DeepseekV3ForCausalLM in the
same process, same compute dtype (``--dtype bfloat16`` is both libraries' default; float32 makes both call
the same sgemm), interleaved runs (median ratio); ``--ours-in-place`` times ours on the fp8 checkpoint as
loaded by default (weights stay mapped in their stored form, dequantized per use); then peak memory after
loading the fp8 checkpoint in place and one forward over its file size, in a subprocess with psutil.
``--offload-check``: a real-shape checkpoint run with ``offload=True`` (prefill + a few decode steps with the
KV cache) in a subprocess; peak anonymous RSS (``RssAnon`` in /proc/self/status, sampled
every 2 ms) above the post-import baseline against two of the largest decoder layer's bytes plus the
cache. The memory-mapped embedding and head are file-backed pages (``RssFile``), reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.converters.convert import ConvertOptions, convert

MEM_SCRIPT = """
import json, sys, psutil, torch, dsv3tools
p = psutil.Process(); base = p.memory_info().rss; peak = base
offload = sys.argv[2] == "1"
m = dsv3tools.load_model(sys.argv[1], offload=offload)
peak = max(peak, p.memory_info().rss)
class Peak:
    def __init__(self): self.v = 0
    def __call__(self, *a): self.v = max(self.v, p.memory_info().rss)
pk = Peak()
for mod in m.modules():
    mod.register_forward_hook(pk)
with torch.no_grad():
    m(torch.randint(5, 100, (1, 64)))
print(json.dumps({"base": base, "after_load": peak, "peak": max(peak, pk.v)}))
"""


OFFLOAD_SCRIPT = """
import json, sys, threading, time, torch, dsv3tools
KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in KEYS:
                out[k] = int(v.split()[0]) * 1024
    return out
class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True); self.peak, self.stop = {}, False
    def run(self):
        while not self.stop:
            for k, v in status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(0.002)
path, t, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
base = status()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
sampler = Sampler(); sampler.start()
m = dsv3tools.load_model(path, offload=True)
loaded = status()
ids = torch.randint(5, 1000, (1, t), generator=torch.Generator().manual_seed(0))
cache = m.new_cache(1, t + steps)
start = time.perf_counter()
with torch.inference_mode():
    logits = m(ids, cache=cache)
    for i in range(steps):
        logits = m(logits[:, -1:].argmax(-1), start_pos=t + i, cache=cache)
wall = time.perf_counter() - start
sampler.stop = True; sampler.join()
peak = dict(sampler.peak, VmHWM=status()["VmHWM"])
cache_bytes = sum(c.kvpe.nbytes for c in cache.layers.values()) + cache.mask.nbytes
print(json.dumps({"base": base, "after_load": loaded, "peak": peak, "cache_bytes": cache_bytes, "wall_s": wall}))
"""


def hf_model(path: Path, dtype: torch.dtype):
    """transformers' DeepseekV3ForCausalLM through its own loader (YaRN and the fused experts are its own
    doing; the MTP layer is left unloaded) in ``dtype``."""
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _timed(fn, setup=None) -> float:
    """Wall time of one ``fn`` call (``setup`` runs untimed first; its result is passed to ``fn``)."""
    arg = setup() if setup else None
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


def _decoders(ours, hf, ids: torch.Tensor, decode: int):
    """(setup, timed decode loop) per model: the setup runs the prefill into a fresh cache."""
    from transformers import DynamicCache

    n, step = ids.shape[1], torch.tensor([[7]])

    def ours_setup():
        cache = ours.new_cache(1, n + decode)
        ours(ids, cache=cache)
        return cache

    def ours_decode(cache):
        for i in range(decode):
            ours(step, start_pos=n + i, cache=cache)

    def hf_setup():
        cache = DynamicCache(config=hf.config)
        hf(ids, past_key_values=cache, use_cache=True)
        return cache

    def hf_decode(cache):
        for _ in range(decode):
            hf(step, past_key_values=cache, use_cache=True)

    return {"ours": (ours_setup, ours_decode), "transformers": (hf_setup, hf_decode)}


@torch.inference_mode()
def speed(
    bf16_dir: Path,
    dtype: torch.dtype,
    prompt_len: int,
    decode: int,
    repeats: int,
    runs: int,
    ours_dir: Path | None,
) -> dict:
    """Prefill and decode tokens/s of ours (materialized, ``auto`` attention; with ``ours_dir``: that
    checkpoint in place, the default) and transformers in this process: ``runs`` runs, each the best of
    ``repeats`` alternating calls; ratios are medians over runs."""
    import dsv3tools

    ids = torch.randint(5, 4000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ours = dsv3tools.load_model(
        ours_dir or bf16_dir, dtype=dtype, materialize=ours_dir is None, attn_impl="auto"
    )
    hf = hf_model(bf16_dir, dtype)
    models, dec = {"ours": ours, "transformers": hf}, _decoders(ours, hf, ids, decode)
    cases = [(n, "prefill", lambda _, m=m: m(ids), None) for n, m in models.items()]
    cases += [(n, "decode", dec[n][1], dec[n][0]) for n in models]
    for _, _, fn, setup in cases:  # warm-up
        _timed(fn, setup)
    per_run = []
    for _ in range(runs):
        best: dict = {}
        for _ in range(repeats):  # the models alternate, so load changes hit both alike
            for name, kind, fn, setup in cases:
                key = (name, kind)
                best[key] = min(best.get(key, float("inf")), _timed(fn, setup))
        r = {
            n: {"prefill_tok_s": prompt_len / best[n, "prefill"], "decode_tok_s": decode / best[n, "decode"]}
            for n in models
        }
        r["speedup_prefill"] = r["ours"]["prefill_tok_s"] / r["transformers"]["prefill_tok_s"]
        r["speedup_decode"] = r["ours"]["decode_tok_s"] / r["transformers"]["decode_tok_s"]
        per_run.append(r)
    med = {k: statistics.median(r[k] for r in per_run) for k in ("speedup_prefill", "speedup_decode")}
    return {"median": med, "runs": per_run}


def memory(path: Path, offload: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEM_SCRIPT, str(path), "1" if offload else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["file_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return r


def offload_check(workdir: Path, layers: int, experts: int, tokens: int, steps: int, threads: int) -> dict:
    """Peak anonymous memory of a streamed (offload) prefill + decode on a real-shape checkpoint against
    two of its largest decoder layers plus the KV cache."""
    from dsv3tools.checkpoint.layout import layer_of

    path = workdir / f"real-shape-{layers}x{experts}"
    if not (path / "config.json").is_file():
        synthesize(path, preset="real-shape", layers=layers, experts=experts)
    ck = Checkpoint(path)
    by_layer: dict = {}
    for name, info in ck.infos().items():
        by_layer[layer_of(name)] = by_layer.get(layer_of(name), 0) + info.nbytes
    biggest = max(v for k, v in by_layer.items() if k is not None and k < ck.config.num_hidden_layers)
    args = [str(path), str(tokens), str(steps), str(threads)]
    out = subprocess.run([sys.executable, "-c", OFFLOAD_SCRIPT, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"offload run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    anon = r["peak"]["RssAnon"] - r["base"]["RssAnon"]
    bound = 2 * biggest + r["cache_bytes"]
    r.update(
        tokens=tokens,
        decode_steps=steps,
        file_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
        largest_layer_bytes=biggest,
        head_bytes=ck.info("lm_head.weight").nbytes,
        bound_bytes=bound,
        peak_anon_over_base=anon,
        peak_anon_over_bound=anon / bound,
        peak_rss_over_base=r["peak"]["VmHWM"] - r["base"]["VmRSS"],
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs; ratios are their median")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--ours-in-place", action="store_true", help="ours on the fp8 checkpoint in place (not materialized)"
    )
    ap.add_argument("--offload-check", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--offload-tokens", type=int, default=16)
    ap.add_argument("--offload-steps", type=int, default=2)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dsv3-bench-"))
    if a.offload_check:
        threads = torch.get_num_threads()
        r = offload_check(work, a.layers, a.experts, a.offload_tokens, a.offload_steps, threads)
        print(json.dumps(r, indent=2))
        return
    fp8 = work / "small-fp8"
    if not (fp8 / "config.json").is_file():
        synthesize(fp8, preset="small")
    bf16 = work / "small-bf16"
    if not (bf16 / "config.json").is_file():
        convert(fp8, bf16, ConvertOptions(to="bf16"))
    result = {
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "prompt_len": a.prompt_len,
        "decode": a.decode,
        "ours": "fp8 in place" if a.ours_in_place else "bf16 materialized",
        "speed": speed(
            bf16,
            getattr(torch, a.dtype),
            a.prompt_len,
            a.decode,
            a.repeats,
            a.runs,
            fp8 if a.ours_in_place else None,
        ),
        "memory_fp8": memory(fp8, offload=False),
    }
    m = result["memory_fp8"]
    m["peak_over_file"] = (m["peak"] - m["base"]) / m["file_bytes"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
