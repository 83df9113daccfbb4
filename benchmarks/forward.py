"""Forward benchmarks (run by hand; results in benchmarks/RESULTS_forward.md).

    python benchmarks/forward.py [--workdir DIR] [--dtype float32|bfloat16] [--prompt-len 256] [--decode 32]
    python benchmarks/forward.py --offload-check [--layers 2 --experts 8]

Default: the ``small`` preset (fp8 and its bf16 conversion, same weights), prefill and decode tokens/s of
the built-in forward against transformers' DeepseekV3ForCausalLM in the same run and the same compute dtype,
then peak memory after loading the fp8 checkpoint (and one forward) over its file size, measured in a
subprocess with psutil. ``--offload-check``: a real-shape checkpoint run with ``offload=True``; peak RSS
above the post-import baseline against the largest layer's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3tools.checkpoint import Checkpoint
from dsv3tools.quant import fp8_block_dequant
from dsv3tools.synth import synthesize

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


def bf16_copy(src: Path, dst: Path) -> Path:
    """The bf16 conversion of an fp8 checkpoint (bf16(float32(q) * s)), written with the foundation writer."""
    from safetensors.torch import save_file

    ck = Checkpoint(src)
    out = {}
    for n in ck.weight_map:
        if n.endswith("_scale_inv"):
            continue
        t = ck.get(n)
        out[n] = (
            fp8_block_dequant(t, ck.get(f"{n}_scale_inv"), (128, 128))
            if t.dtype == torch.float8_e4m3fn
            else t
        )
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(ck.config.to_dict(quantization_config=None)))
    return dst


def hf_model(path: Path, dtype: torch.dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    ck = Checkpoint(path)
    d = dict(ck.config.raw)
    d.pop("quantization_config", None)
    rs = {k: v for k, v in d.pop("rope_scaling").items() if k != "type"}
    d["rope_parameters"] = dict(rs, rope_type="yarn", rope_theta=d["rope_theta"])
    cfg = DeepseekV3Config(**d, rope_interleave=True)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    sd = {
        n: ck.get(n).to(dtype)
        for n in ck.weight_map
        if not n.startswith(f"model.layers.{ck.config.num_hidden_layers}.")
    }
    for layer in ck.config.moe_layers:
        if layer < ck.config.num_hidden_layers:
            p, es = f"model.layers.{layer}.mlp.experts", range(ck.config.n_routed_experts)
            sd[f"{p}.gate_up_proj"] = torch.stack(
                [
                    torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")])
                    for e in es
                ]
            )
            sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in es])
    model.load_state_dict(sd, strict=False, assign=True)
    model.model.rotary_emb.__init__(cfg)  # buffers were on meta
    return model.to(dtype).eval()


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def speed(bf16_dir: Path, dtype: torch.dtype, prompt_len: int, decode: int, repeats: int) -> dict:
    from transformers import DynamicCache

    import dsv3tools

    ids = torch.randint(5, 4000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ours, hf = dsv3tools.load_model(bf16_dir, dtype=dtype), hf_model(bf16_dir, dtype)
    step = torch.tensor([[7]])

    def ours_decode():
        cache = ours.new_cache(1, prompt_len + decode)
        ours(ids, cache=cache)
        for i in range(decode):
            ours(step, start_pos=prompt_len + i, cache=cache)

    def hf_decode():
        cache = DynamicCache(config=hf.config)
        hf(ids, past_key_values=cache, use_cache=True)
        for _ in range(decode):
            hf(step, past_key_values=cache, use_cache=True)

    res = {}
    for name, model, dec in (("ours", ours, ours_decode), ("transformers", hf, hf_decode)):
        pre = _time(lambda m=model: m(ids), repeats)
        both = _time(dec, repeats)
        res[name] = {"prefill_tok_s": prompt_len / pre, "decode_tok_s": decode / max(both - pre, 1e-9)}
    res["speedup_prefill"] = res["ours"]["prefill_tok_s"] / res["transformers"]["prefill_tok_s"]
    res["speedup_decode"] = res["ours"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
    return res


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


def offload_check(workdir: Path, layers: int, experts: int) -> dict:
    path = workdir / f"real-shape-{layers}x{experts}"
    if not (path / "config.json").is_file():
        synthesize(path, preset="real-shape", layers=layers, experts=experts)
    ck = Checkpoint(path)
    by_layer: dict = {}
    for name, info in ck.infos().items():
        from dsv3tools.layout import layer_of

        by_layer[layer_of(name)] = by_layer.get(layer_of(name), 0) + info.nbytes
    biggest = max(v for k, v in by_layer.items() if k is not None and k < ck.config.num_hidden_layers)
    head = ck.info("lm_head.weight").nbytes
    r = memory(path, offload=True)
    r.update(largest_layer_bytes=biggest, head_bytes=head, kv_cache_note="no cache (full-sequence forward)")
    r["peak_over_base"] = r["peak"] - r["base"]
    r["peak_over_base_in_layers"] = r["peak_over_base"] / biggest
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-check", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dsv3-bench-"))
    if a.offload_check:
        print(json.dumps(offload_check(work, a.layers, a.experts), indent=2))
        return
    fp8 = work / "small-fp8"
    if not (fp8 / "config.json").is_file():
        synthesize(fp8, preset="small")
    bf16 = work / "small-bf16"
    if not (bf16 / "config.json").is_file():
        bf16_copy(fp8, bf16)
    result = {
        "dtype": a.dtype,
        "prompt_len": a.prompt_len,
        "decode": a.decode,
        "speed": speed(bf16, getattr(torch, a.dtype), a.prompt_len, a.decode, a.repeats),
        "memory_fp8": memory(fp8, offload=False),
    }
    m = result["memory_fp8"]
    m["peak_over_file"] = (m["peak"] - m["base"]) / m["file_bytes"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
