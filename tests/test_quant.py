"""The reference quantization formulas of dsv3tools.quant.reference against straightforward float64 loops."""

from __future__ import annotations

import pytest
import torch

from dsv3tools.model.linear import fp8_dequant_bf16
from dsv3tools.quant.fp8_lut import fp8_dequant_lut
from dsv3tools.quant.reference import fp8_block_dequant, int4_dequant, int4_pack, int4_quant, int4_unpack


def _group_error(g: torch.Tensor, scale: float) -> float:
    q = torch.clamp(torch.round(g / scale), -8, 7)
    return float(((q * scale - g) ** 2).sum())


def test_int4_rtn_and_mse_against_per_group_loops() -> None:
    gen = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    w = torch.randn(8, 256, generator=gen) * torch.rand(8, 1, generator=gen)
    q_rtn, s_rtn = int4_quant(w, 128, "rtn")
    q_mse, s_mse = int4_quant(w, 128, "mse", grid=20, min_ratio=0.75)
    ratios = torch.linspace(1.0, 0.75, 20).tolist()
    for r in range(8):
        for k in range(2):
            g = w[r, k * 128 : (k + 1) * 128].double()
            amax = float(g.abs().max())
            rtn_scale = float(torch.tensor(amax / 7.5).to(torch.bfloat16))
            assert float(s_rtn[r, k]) == rtn_scale
            assert torch.equal(
                q_rtn[r, k * 128 : (k + 1) * 128].double(), torch.clamp(torch.round(g / rtn_scale), -8, 7)
            )
            cands = [
                float(torch.tensor(amax * c / 7.5, dtype=torch.float32).to(torch.bfloat16)) for c in ratios
            ]
            errs = [_group_error(g, c) for c in cands]
            chosen = float(s_mse[r, k])
            assert chosen in cands
            assert _group_error(g, chosen) <= min(errs) * (1 + 1e-6)
            assert _group_error(g, chosen) <= _group_error(g, rtn_scale) * (1 + 1e-6)
    for q, s in ((q_rtn, s_rtn), (q_mse, s_mse)):
        packed = int4_pack(q)
        assert torch.equal(int4_unpack(packed), q)
        ref = (q.double().view(8, 2, 128) * s.double().view(8, 2, 1)).view(8, 256)
        assert torch.equal(int4_dequant(packed, s, (8, 256), torch.float32), ref.float())


@pytest.mark.parametrize("shape", [(576, 7168), (300, 200), (128, 128 * 257)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_lut_is_the_formula_bit_for_bit(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The table path against the reference formula, compared bit by bit: every code (NaN included), ragged blocks;
    more than 256 block columns is refused (uint16 index), and then the linear's dequant still matches."""
    g = torch.Generator().manual_seed(shape[0])
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) * 1e-2 + 1e-4
    ref = fp8_block_dequant(q, s, (128, 128), dtype)
    out, bits = torch.empty(shape, dtype=dtype), torch.int32 if dtype == torch.float32 else torch.int16
    if shape[1] > 256 * 128:
        assert not fp8_dequant_lut(q, s, out, (128, 128))
    else:
        assert fp8_dequant_lut(q, s, out, (128, 128))
        assert torch.equal(out.view(bits), ref.view(bits))
    if dtype == torch.bfloat16:
        assert torch.equal(fp8_dequant_bf16(q, s, (128, 128)).view(bits), ref.view(bits))
