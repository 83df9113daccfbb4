"""The DeepSeek-V3.2 forward (SPEC sec. 11) against transformers' DeepseekV32ForCausalLM: DSA past
index_topk in both MLA paths, full sequence and cached decode; with keys <= index_topk the output is our
dense MLA exactly; query chunking, padding, offload, the fp8 scoring option and the MTP layer's indexer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.synth import synthesize
from dsv3tools.model import indexer as indexer_mod
from dsv3tools.model.api import load_model
from dsv3tools.model.attention import MLA
from dsv3tools.model.indexer import Indexer, fp8_round, hadamard

SEQ = 176  # past tiny's index_topk (64) and its YaRN original length (128)
TOPK = 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def v32_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v32") / "tiny-v32-bf16"
    synthesize(out, preset="tiny", family="v3.2", dtype="bf16")
    return out


@pytest.fixture(scope="module")
def v32_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v32") / "tiny-v32-fp8"
    synthesize(out, preset="tiny", family="v3.2")
    return out


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(5, 500, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_ref(v32_bf16: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' DeepseekV32ForCausalLM through its own loader, float32, eager attention."""
    from transformers import DeepseekV32ForCausalLM

    model = DeepseekV32ForCausalLM.from_pretrained(v32_bf16, dtype=torch.float32, attn_implementation="eager")
    assert model.config.index_topk == TOPK
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_parity_with_transformers(v32_bf16: Path, ids, hf_ref, attn_impl: str) -> None:
    model = load_model(v32_bf16, dtype=torch.float32, attn_impl=attn_impl)
    with torch.no_grad():
        full = model(ids)
        assert rel_err(full, hf_ref) < 1e-4
        cache, prefill = model.new_cache(2, SEQ), 150
        steps = [model(ids[:, :prefill], cache=cache)]
        steps += [model(ids[:, i : i + 1], start_pos=i, cache=cache) for i in range(prefill, SEQ)]
        assert rel_err(torch.cat(steps, 1), hf_ref) < 1e-4
        assert cache.layers[0].index_k.shape[-1] == 64  # index_head_dim values per token beside the latent
        for m in model.modules():  # the selection matters: dense attention over all keys differs
            if isinstance(m, MLA):
                m.indexer.topk = 10**9
        assert rel_err(model(ids), hf_ref) > 1e-3


def test_selection_has_no_ties(v32_bf16: Path, ids) -> None:
    """The parity above is meaningful only where the top-k is unique: check every boundary gap is > 0."""
    model = load_model(v32_bf16, dtype=torch.float32)
    gaps: list[float] = []
    real_select = Indexer.select

    def select(self, q, w, keys, allowed):
        sc = self.scores(q, w, keys)
        if allowed is not None:
            sc = sc.masked_fill(~allowed, float("-inf"))
        top = sc.topk(TOPK + 1, dim=-1).values
        full = torch.isfinite(top[..., -1])
        if full.any():
            gaps.append(float((top[..., -2] - top[..., -1])[full].min()))
        return real_select(self, q, w, keys, allowed)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(Indexer, "select", select)
        model(ids)
    assert len(gaps) == 3 and min(gaps) > 0  # one per main layer


def test_short_sequences_equal_dense_exactly(v32_fp8: Path, ids) -> None:
    """keys <= index_topk: every causal key is selected, so the logits are our dense MLA's bit for bit
    (bf16 compute, full sequence and cached decode)."""
    sparse = load_model(v32_fp8)
    dense = load_model(v32_fp8)
    for m in dense.modules():
        if isinstance(m, MLA):
            m.indexer = None
    short = ids[:, :TOPK]
    with torch.no_grad():
        assert torch.equal(sparse(short), dense(short))
        outs = []
        for model in (sparse, dense):
            cache = model.new_cache(2, TOPK)
            steps = [model(short[:, :48], cache=cache)]
            steps += [model(short[:, i : i + 1], start_pos=i, cache=cache) for i in range(48, TOPK)]
            outs.append(torch.cat(steps, 1))
        assert torch.equal(*outs)


def test_query_chunks_same_logits(v32_bf16: Path, ids, monkeypatch) -> None:
    """Chunks of a few queries (scores and gathered rows bounded) give the one-chunk logits."""
    for impl in ("absorb", "naive"):
        model = load_model(v32_bf16, dtype=torch.float32, attn_impl=impl)
        with torch.no_grad():
            whole = model(ids)
            monkeypatch.setattr(indexer_mod, "SCORE_CHUNK_ELEMS", 2 * 16 * SEQ * 7)  # 7 queries a chunk
            monkeypatch.setattr(indexer_mod, "GATHER_CHUNK_ELEMS", 2 * TOPK * 160 * 5)  # 5 for absorb
            assert rel_err(model(ids), whole) < 1e-6
            monkeypatch.undo()


def test_left_padding_matches_unpadded(v32_fp8: Path, ids) -> None:
    """A left-padded row gives the unpadded row's logits at its real positions (the indexer never
    selects padding keys), in the full forward and in cached decode."""
    model = load_model(v32_fp8, dtype=torch.float32)
    pad, n = 9, 100
    row = ids[:1, :n]
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)], 1)
    with torch.no_grad():
        ref = model(row)
        got = model(padded, attention_mask=mask)[:, pad:]
        assert rel_err(got, ref) < 1e-5
        cache = model.new_cache(1, pad + n)
        steps = [model(padded[:, : pad + 80], cache=cache, attention_mask=mask[:, : pad + 80])]
        steps += [model(padded[:, i : i + 1], start_pos=i, cache=cache) for i in range(pad + 80, pad + n)]
        assert rel_err(torch.cat(steps, 1)[:, pad:], ref) < 1e-5


def test_offload_same_logits(v32_fp8: Path, ids) -> None:
    with torch.no_grad():
        ref = load_model(v32_fp8)(ids[:1])
        assert torch.equal(load_model(v32_fp8, offload=True)(ids[:1]), ref)


def test_mtp_layer_runs_its_own_indexer(v32_fp8: Path, ids) -> None:
    """The MTP layer (3) selects with its own indexer: full and cached MTP logits agree past index_topk,
    and differ from dense attention over all keys."""
    model = load_model(v32_fp8, dtype=torch.float32)
    mtp = model.model.layers["3"].self_attn
    assert mtp.indexer is not None and mtp.indexer.wq_b.fmt == "fp8"
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden=True)
        full = model.mtp_forward(hidden[:, :-1], ids[:, 1:])[0]
        cache = model.new_cache(2, SEQ)
        h0 = model(ids[:, :160], cache=cache, return_hidden=True)[1]
        steps = [model.mtp_forward(h0, ids[:, 1:161], cache=cache)[0]]
        for i in range(160, SEQ - 1):
            hi = model(ids[:, i : i + 1], start_pos=i, cache=cache, return_hidden=True)[1]
            steps.append(model.mtp_forward(hi, ids[:, i + 1 : i + 2], start_pos=i, cache=cache)[0])
        assert rel_err(torch.cat(steps, 1), full) < 1e-5
        mtp.indexer.topk = 10**9
        assert rel_err(model.mtp_forward(hidden[:, :-1], ids[:, 1:])[0], full) > 1e-3


def test_fp8_indexer_precision(v32_fp8: Path, ids) -> None:
    """Hadamard is orthonormal (scores unchanged before rounding); e4m3 block rounding stays within the
    format's step; the fp8-scored model stays close to the float32 default (reported, not the parity path)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g)
    assert torch.allclose(hadamard(x) @ hadamard(y).T, x @ y.T, atol=1e-4)
    r = fp8_round(x)
    assert float(((r - x).abs() / x.abs().amax(-1, keepdim=True)).max()) < 2**-4
    ref = load_model(v32_fp8, dtype=torch.float32)
    fp8 = load_model(v32_fp8, dtype=torch.float32, indexer_precision="fp8")
    with torch.no_grad():
        a, b = ref(ids), fp8(ids)
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert agree > 0.8 and not torch.equal(a, b)
