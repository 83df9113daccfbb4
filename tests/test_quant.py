"""The reference quantization formulas of dsv3tools.quant against straightforward float64 loops."""

from __future__ import annotations

import torch

from dsv3tools.quant import int4_dequant, int4_pack, int4_quant, int4_unpack


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
