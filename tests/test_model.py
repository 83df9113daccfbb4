"""The built-in forward against independent references: transformers' DeepseekV3ForCausalLM (both attention
paths, full sequence and cached decoding, past the YaRN original length, group-limited routing), the FP8
checkpoint against its bf16 conversion, int4 against a float64 forward over the dequantized weights, the
MTP module against a float64 re-computation of SPEC sec. 4 written here with plain torch ops, padding,
materialized weights (stacked experts), offload streaming (with row-chunked dequantization), routing
counts, training (autograd) and save/load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsv3tools.checkpoint.layout import model_weights
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.errors import DSV3Error
from dsv3tools.model import linear as linear_mod
from dsv3tools.model.api import load_model
from dsv3tools.model.attention import MLA
from dsv3tools.model.linear import Linear, dense
from dsv3tools.model.moe import Gate
from dsv3tools.model.saving import random_model, save_checkpoint
from dsv3tools.model.transformer import Transformer
from dsv3tools.quant.reference import fp8_block_dequant, int4_dequant, int4_pack, int4_quant
from tests.conftest import SPEC_INT4_WEIGHTS

SEQ = 176  # past tiny's original_max_position_embeddings (128)


# ---- checkpoint helpers (independent of the converter) ------------------------------------------------
def _copy_meta(src: Path, dst: Path, config: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config))


def write_bf16_conversion(fp8_dir: Path, dst: Path) -> Path:
    """bf16(float32(q) * s) for every FP8 linear; everything else copied."""
    ck = Checkpoint(fp8_dir)
    out = {}
    for name in ck.weight_map:
        if name.endswith("_scale_inv"):
            continue
        t = ck.get(name)
        if t.dtype == torch.float8_e4m3fn:
            t = fp8_block_dequant(t, ck.get(f"{name}_scale_inv"), (128, 128), torch.bfloat16)
        out[name] = t.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    cfg = dict(ck.config.raw)
    cfg.pop("quantization_config")
    _copy_meta(fp8_dir, dst, cfg)
    return dst


INT4_QC = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": SPEC_INT4_WEIGHTS,
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*mlp\\.gate$"],
}


def write_int4(bf16_dir: Path, dst: Path, dequant_dst: Path) -> tuple[Path, Path]:
    """compressed-tensors int4 (all quantizable linears) and an f32 copy of its dequantized weights."""
    ck = Checkpoint(bf16_dir)
    packed, deq = {}, {}
    for w in model_weights(ck.config):
        name = f"{w.name}.weight" if w.linear else w.name
        t = ck.get(name)
        if w.linear and w.quantizable:
            q, scale = int4_quant(t, 128)
            packed[f"{w.name}.weight_packed"] = int4_pack(q)
            packed[f"{w.name}.weight_scale"] = scale
            packed[f"{w.name}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            deq[name] = int4_dequant(packed[f"{w.name}.weight_packed"], scale, tuple(t.shape), torch.float32)
        else:
            packed[name] = t
            deq[name] = t.float()
    for d, tensors, qc in ((dst, packed, INT4_QC), (dequant_dst, deq, None)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"))
        _copy_meta(bf16_dir, d, ck.config.to_dict(quantization_config=qc))
    return dst, dequant_dst


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---- transformers reference --------------------------------------------------------------------------
def hf_model(path: Path):
    """transformers' DeepseekV3ForCausalLM through its own loader (it reads YaRN and fuses the experts
    itself; the MTP layer it has no module for is left unloaded), float32, eager attention."""
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def parity(tiny_bf16: Path):
    ids = torch.randint(5, 500, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(tiny_bf16)(ids).logits
    return ids, ref


def check_routing(model: Transformer, ids: torch.Tensor) -> None:
    """Assert the routing exercises the group limit and stays away from the case where transformers'
    0.0 group mask differs from the SPEC's -inf: transformers masks non-selected groups' biased scores with
    0.0 before the top-k, so a masked expert could only outrank a selected-group expert if the k-th best
    biased score in the selected groups were < 0. We assert it is > 0 for every token and layer."""
    seen = {"limited": 0, "tokens": 0}

    def hook(gate: Gate, args, _out):
        s = gate.scores(args[0]) + gate.e_score_correction_bias.float()
        n = s.shape[0]
        grouped = s.view(n, gate.n_group, -1)
        keep = grouped.topk(2, dim=-1).values.sum(-1).topk(gate.topk_group, dim=-1).indices
        in_groups = torch.gather(grouped, 1, keep.unsqueeze(-1).expand(-1, -1, grouped.shape[-1])).reshape(
            n, -1
        )
        assert (in_groups.topk(gate.topk, dim=-1).values[:, -1] > 0).all()
        global_top = s.topk(gate.topk, dim=-1).values[:, -1:]
        seen["limited"] += int((in_groups.topk(gate.topk, dim=-1).values[:, -1:] < global_top).sum())
        seen["tokens"] += n

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Gate)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert seen["limited"] > 0, "no token had a better expert outside its selected groups"


@pytest.mark.parametrize(("attn_impl", "materialize"), [("absorb", False), ("naive", False), ("auto", True)])
def test_parity_with_transformers(tiny_bf16: Path, parity, attn_impl: str, materialize: bool) -> None:
    """``auto`` + materialized: the prefill runs the naive path, the decode steps the absorbed one, and the
    routed experts run on the stacked weights (grouped for the prefill, per token for batch-1 decode)."""
    ids, ref = parity
    model = load_model(tiny_bf16, dtype=torch.float32, attn_impl=attn_impl, materialize=materialize)
    if attn_impl == "absorb":
        check_routing(model, ids)
    with torch.no_grad():
        full = model(ids)
        assert rel_err(full, ref) < 1e-4
        cache, prefill = model.new_cache(2, SEQ), 164
        steps = [model(ids[:, :prefill], cache=cache)]
        for i in range(prefill, SEQ):
            steps.append(model(ids[:, i : i + 1], start_pos=i, cache=cache))
        assert rel_err(torch.cat(steps, 1), ref) < 1e-4
        if materialize:  # batch-1 decode takes the single-token expert path
            one = model.new_cache(1, SEQ)
            model(ids[:1, :prefill], cache=one)
            last = [model(ids[:1, i : i + 1], start_pos=i, cache=one) for i in range(prefill, prefill + 2)]
            assert rel_err(torch.cat(last, 1), ref[:1, prefill : prefill + 2]) < 1e-4
    assert cache.layers[0].kv.shape[-1] + cache.layers[0].pe.shape[-1] == 128 + 32  # kv_lora_rank + rope dim


def test_materialize_same_logits_and_stacked_views(tiny_fp8: Path) -> None:
    """Weights converted once at load give the per-use dequant logits; experts are views of the stacks."""
    ids = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = load_model(tiny_fp8, dtype=torch.float32)(ids)
        model = load_model(tiny_fp8, dtype=torch.float32, materialize=True)
        assert rel_err(model(ids), ref) < 1e-6
        cache = model.new_cache(1, 24)
        steps = [model(ids[:, :20], cache=cache)]
        steps += [model(ids[:, i : i + 1], start_pos=i, cache=cache) for i in range(20, 24)]
        assert rel_err(torch.cat(steps, 1), ref) < 1e-6
    moe = model.model.layers["1"].mlp
    gate_up, down = moe.stacked
    assert gate_up.dtype == down.dtype == torch.float32 and gate_up.shape == (16, 2 * 128, 256)
    up = moe.experts["3"].up_proj
    assert up.fmt == "float" and up.weight.data_ptr() == gate_up[3, 128:].data_ptr()
    assert model.model.layers["0"].self_attn.q_b_proj.weight.dtype == torch.float32
    assert MLA(Checkpoint(tiny_fp8).config, "auto")._use_naive(SEQ, SEQ)  # prefill: naive is cheaper
    assert not MLA(Checkpoint(tiny_fp8).config, "auto")._use_naive(1, SEQ)  # decode: absorbed is cheaper


def test_left_padding_matches_unpadded(tiny_fp8: Path) -> None:
    model = load_model(tiny_fp8, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(5, 500, (1, 20), generator=g), torch.randint(5, 500, (1, 12), generator=g)
    ids = torch.cat([a, torch.cat([torch.full((1, 8), 2), b], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 8), torch.ones(1, 12)], 1)]).long()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        assert rel_err(batch[0], model(a)[0]) < 1e-5
        assert rel_err(batch[1, 8:], model(b)[0]) < 1e-5
        cache = model.new_cache(2, 24)
        model(ids, cache=cache, attention_mask=mask)
        step = model(torch.tensor([[7], [7]]), start_pos=20, cache=cache)
        assert rel_err(step[1, 0], model(torch.cat([b, torch.tensor([[7]])], 1))[0, -1]) < 1e-5


def test_fp8_and_bf16_conversion_identical(tiny_fp8: Path, tmp_path: Path) -> None:
    conv = write_bf16_conversion(tiny_fp8, tmp_path / "bf16")
    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            a = load_model(tiny_fp8, dtype=dtype, backend="dequant")(ids)
            b = load_model(conv, dtype=dtype, backend="dequant")(ids)
        assert torch.equal(a, b)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_dense_half_route_is_torch_half_gemm_arithmetic(monkeypatch, rows: int) -> None:
    """On CPUs without bf16 matmul units ``dense`` computes bf16 products of >= 4 rows in float32 with one
    rounding; fewer rows keep torch's own bf16 GEMM. Both are one rounding of a float32-accumulated sum of
    exact products: within one bf16 ulp of the float64 result."""
    monkeypatch.setattr(linear_mod, "cpu_half_matmul_is_slow", lambda dtype: True)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 512, generator=g).bfloat16(), torch.randn(96, 512, generator=g).bfloat16()
    got, exact = dense(x, w), x.double() @ w.double().T
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= _bf16_ulp(exact)).all()
    upcast = torch.nn.functional.linear(x.float(), w.float()).bfloat16()
    assert torch.equal(
        got, upcast if rows >= linear_mod.UPCAST_MIN_ROWS else torch.nn.functional.linear(x, w)
    )
    torch_half = torch.nn.functional.linear(x, w)
    assert ((torch_half.double() - exact).abs() <= _bf16_ulp(exact)).all()
    monkeypatch.setattr(linear_mod, "UPCAST_CHUNK_ELEMS", 512 * 40)  # 40 weight rows at a time: 3 chunks
    chunked = dense(x, w)
    assert ((chunked.double() - exact).abs() <= _bf16_ulp(exact)).all()
    monkeypatch.setattr(linear_mod, "cpu_half_matmul_is_slow", lambda dtype: False)
    assert torch.equal(dense(x, w), torch_half)


def test_int4_matches_float64_forward(tiny_bf16: Path, tmp_path: Path) -> None:
    q4, deq = write_int4(tiny_bf16, tmp_path / "int4", tmp_path / "int4-deq")
    model = load_model(q4, dtype=torch.float32)
    assert model.model.layers["1"].mlp.experts["0"].up_proj.fmt == "int4"
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_model(deq, dtype=torch.float64)(ids)
        assert rel_err(model(ids), ref) < 1e-3


def _ref_rope(c, t: int) -> torch.Tensor:
    """YaRN-scaled rotations e^(i*pos*freq) as complex float64 [t, rope_dim / 2] (DeepSeek's clamped ramp)."""
    rs, d = c.rope_scaling_dict, c.qk_rope_head_dim
    base = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cd = [
        d
        * math.log(rs["original_max_position_embeddings"] / (r * 2 * math.pi))
        / (2 * math.log(c.rope_theta))
        for r in (rs["beta_fast"], rs["beta_slow"])
    ]
    low, high = max(math.floor(cd[0]), 0), min(math.ceil(cd[1]), d - 1)  # clamped as in DeepSeek's reference
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freqs = base * (1 - ramp) + base / rs["factor"] * ramp
    return torch.polar(
        torch.ones(t, d // 2, dtype=torch.float64), torch.outer(torch.arange(t, dtype=torch.float64), freqs)
    )


def _ref_attention(c, w, norm, h_in: torch.Tensor) -> torch.Tensor:
    """Naive MLA (causal, no cache) in float64, before o_proj: [b, t, heads * v_head_dim]."""
    b, t, _ = h_in.shape
    rot = _ref_rope(c, t)

    def rope(v):
        return torch.view_as_real(
            torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2)) * rot.view(1, t, 1, -1)
        ).flatten(-2)

    nh, nope, r = c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank
    q = (
        norm(h_in @ w("self_attn.q_a_proj.weight").T, "self_attn.q_a_layernorm.weight")
        @ w("self_attn.q_b_proj.weight").T
    )
    q = q.view(b, t, nh, -1)
    q = torch.cat([q[..., :nope], rope(q[..., nope:])], -1)
    kv = h_in @ w("self_attn.kv_a_proj_with_mqa.weight").T
    k_pe = rope(kv[..., r:].unsqueeze(2))
    kvb = (norm(kv[..., :r], "self_attn.kv_a_layernorm.weight") @ w("self_attn.kv_b_proj.weight").T).view(
        b, t, nh, -1
    )
    k = torch.cat([kvb[..., :nope], k_pe.expand(-1, -1, nh, -1)], -1)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * c.softmax_scale
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return torch.einsum("bhst,bthd->bshd", scores, kvb[..., nope:]).reshape(b, t, -1)


def _ref_moe(c, w, mlp, y: torch.Tensor) -> torch.Tensor:
    """noaux_tc routing (sigmoid, group-limited top-k) and the experts, token by token, in float64."""
    s = torch.sigmoid(y @ w("mlp.gate.weight").T)
    sb = (s + w("mlp.gate.e_score_correction_bias")).view(len(y), c.n_group, -1)
    groups = sb.topk(2, -1).values.sum(-1).topk(c.topk_group, -1).indices
    gm = torch.zeros(len(y), c.n_group, dtype=torch.bool).scatter(1, groups, True)
    top = (
        sb.masked_fill(~gm.unsqueeze(-1), float("-inf"))
        .view(len(y), -1)
        .topk(c.num_experts_per_tok, -1)
        .indices
    )
    gw = s.gather(1, top)
    gw = gw / gw.sum(-1, keepdim=True) * c.routed_scaling_factor
    moe = mlp(y, "mlp.shared_experts")
    for i in range(len(y)):  # a deliberately simple per-token loop
        for j, e in enumerate(top[i].tolist()):
            moe[i] += gw[i, j] * mlp(y[i : i + 1], f"mlp.experts.{e}")[0]
    return moe


def _ref_mtp(ck: Checkpoint, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """SPEC sec. 4 MTP depth 1 in float64 with plain torch ops (naive MLA, complex-number RoPE, noaux_tc)."""
    c = ck.config
    p = f"model.layers.{c.num_hidden_layers}."

    def w(n):
        return ck.get(p + n).double()

    def norm(x, n):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w(n)

    def mlp(x, pre):
        return (
            torch.nn.functional.silu(x @ w(f"{pre}.gate_proj.weight").T) * (x @ w(f"{pre}.up_proj.weight").T)
        ) @ w(f"{pre}.down_proj.weight").T

    x = torch.cat(
        [norm(w("embed_tokens.weight")[next_ids], "enorm.weight"), norm(hidden.double(), "hnorm.weight")], -1
    )
    x = x @ w("eh_proj.weight").T
    b, t, _ = x.shape
    x = x + _ref_attention(c, w, norm, norm(x, "input_layernorm.weight")) @ w("self_attn.o_proj.weight").T
    y = norm(x, "post_attention_layernorm.weight").view(b * t, -1)
    x = x + _ref_moe(c, w, mlp, y).view(b, t, -1)
    return norm(x, "shared_head.norm.weight") @ w("shared_head.head.weight").T


def test_mtp_matches_float64_reference(tiny_bf16: Path) -> None:
    model = load_model(tiny_bf16, dtype=torch.float32, attn_impl="naive")
    ids = torch.randint(5, 500, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, hidden = model(ids[:, :-1], return_hidden=True)
        logits, out = model.mtp_forward(hidden, ids[:, 1:])
        ref = _ref_mtp(Checkpoint(tiny_bf16), hidden, ids[:, 1:])
        assert rel_err(logits, ref) < 1e-4
        assert out.shape == hidden.shape
        model.set_attn_impl("absorb")
        cache = model.new_cache(1, 24)
        steps = [model.mtp_forward(hidden[:, :10], ids[:, 1:11], cache=cache)[0]]
        for i in range(10, 23):
            steps.append(
                model.mtp_forward(hidden[:, i : i + 1], ids[:, i + 1 : i + 2], start_pos=i, cache=cache)[0]
            )
    assert rel_err(torch.cat(steps, 1), ref) < 1e-4
    assert cache.layers[0].kv.abs().sum() == 0  # the MTP cache is separate from the main layers'


def test_offload_streams_same_logits(tiny_fp8: Path) -> None:
    ids = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = load_model(tiny_fp8, dtype=torch.float32)(ids)
        model = load_model(tiny_fp8, dtype=torch.float32, offload=True)
        assert model.model.layers["1"].self_attn.q_a_proj.fmt == "empty"  # nothing resident between uses
        assert model.lm_head.fmt == "float" and model.model.layers["3"].shared_head.head.fmt == "float"
        assert torch.equal(model(ids), ref)
        hidden = model(ids, return_hidden=True)[1]
        assert model.mtp_forward(hidden[:, :-1], ids[:, 1:])[0].shape == (1, 15, 512)
        for m in model.modules():  # row-blocked dequant (128-row blocks; kv_a_proj's last block is ragged)
            if isinstance(m, Linear):
                m.chunk_elems = 128 * 256
        assert rel_err(model(ids), ref) < 1e-6
    with pytest.raises(DSV3Error, match="materialize"):
        load_model(tiny_fp8, offload=True, materialize=True)


def test_routing_counts(tiny_fp8: Path) -> None:
    model = load_model(tiny_fp8, dtype=torch.float32)  # the counts do not depend on the compute dtype
    model.record_routing(True)
    with torch.no_grad():
        model(torch.randint(5, 500, (2, 10)))
    counts = model.routing_counts()
    assert sorted(counts) == [1, 2, 3]
    assert all(int(c.sum()) == 20 * 4 for k, c in counts.items() if k < 3)
    model.reset_routing()
    assert all(int(c.sum()) == 0 for c in model.routing_counts().values())


def test_training_backward_and_save_roundtrip(tiny_bf16: Path, tmp_path: Path) -> None:
    cfg = Checkpoint(tiny_bf16).config
    model = random_model(cfg, dtype=torch.float32, seed=0)
    ids = torch.randint(5, 500, (2, 12))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    loss.backward()
    assert model.model.layers["1"].self_attn.q_b_proj.weight.grad.abs().sum() > 0
    assert model.model.layers["1"].mlp.gate.weight.grad.abs().sum() > 0
    model.model.layers["1"].mlp.gate.e_score_correction_bias.add_(0.01)  # bias balancing updates in place
    out = tmp_path / "saved"
    save_checkpoint(
        model,
        out,
        fmt="bf16",
        tokenizer_files={"tokenizer.json": (tiny_bf16 / "tokenizer.json").read_bytes()},
    )
    with torch.no_grad():
        want = random_model(cfg, dtype=torch.float32)
        for p in want.parameters():
            p.data = p.data.bfloat16().float()
        want.model.layers["1"].mlp.gate.e_score_correction_bias.add_(0.01)
        assert rel_err(load_model(out, dtype=torch.float32)(ids), want(ids)) < 1e-5
    save_checkpoint(model, tmp_path / "fp8", fmt="fp8")
    assert Checkpoint(tmp_path / "fp8").linear_format("model.layers.1.mlp.experts.0.up_proj") == "fp8"
