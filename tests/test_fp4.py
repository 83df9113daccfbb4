"""NVFP4 / MXFP4 convert: compressed-tensors' own compressors decompress our output to exactly our
dequantization (experts and all scope), the packing and scales match examples worked by hand (and
compressed-tensors decompresses those bytes to the hand values), ragged groups are refused as
compressed-tensors refuses them, fp16 overflow stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.converters.convert import ConvertOptions, convert
from dsv3tools.quant.fp4 import (
    e2m1_codes,
    fp4_pack,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
    nvfp4_global_scale,
    nvfp4_quant,
)


def test_fp4_packing_hand_written() -> None:
    x = torch.tensor([[0.5, -1.0, 6.0, -6.0, 0.25, 0.75, 2.5, -0.1]])
    # codes 1, 10, 7, 15, 0, 2, 4, 8 -> bytes low nibble first
    assert fp4_pack(e2m1_codes(x)).tolist() == [[0xA1, 0xF7, 0x20, 0x84]]


def _ct_decompress(fmt: str, sd: dict) -> torch.Tensor:
    """compressed-tensors' own decompressor on a hand-made state dict (the preset's scheme)."""
    from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    comp = NVFP4PackedCompressor if fmt == "nvfp4" else MXFP4PackedCompressor
    scheme = preset_name_to_scheme("NVFP4A16" if fmt == "nvfp4" else "MXFP4A16", ["Linear"])
    return comp.decompress(dict(sd), scheme)["weight"].float()


def test_nvfp4_hand_written_example() -> None:
    """Two groups of 16 and an all-zero row, worked by hand. Tensor amax 3 -> global scale 448 * 6 / 3 = 896.
    Group 0 (amax 3): scale e4m3(896 * 3 / 6) = 448, step 448 / 896 = 0.5, codes of w / 0.5.
    Group 1 (amax 0.75): scale e4m3(896 * 0.75 / 6) = 112, step 0.125, codes of w / 0.125.
    The zero row's scales are 0, stored as 0.125 (compressed-tensors' zero-scale rule)."""
    g0 = [3.0, -1.5, 0.25, 0.75, -0.5, 2.0, 1.0, 0.0] + [0.5] * 8  # / 0.5: 6 -3 .5 1.5 -1 4 2 0, 1 x 8
    g1 = [0.75, -0.375, 0.0625, 0.125, 0.5, -0.75, 0.25, 0.1875] + [0.0] * 8  # / 0.125: 6 -3 .5 1 4 -6 2 1.5
    w = torch.tensor([g0 + g1, [0.0] * 32], dtype=torch.bfloat16)
    # codes g0: 7 13 1 3 10 6 4 0 2..; g1: 7 13 1 2 6 15 4 3 0..; two per byte, even column in the low nibble
    row0 = [0xD7, 0x31, 0x6A, 0x04] + [0x22] * 4 + [0xD7, 0x21, 0xF6, 0x34] + [0x00] * 4
    gs = nvfp4_global_scale(w.float().abs().amax())
    assert gs.tolist() == [896.0]
    packed, scale = nvfp4_quant(w, gs)
    assert packed.tolist() == [row0, [0x00] * 16]
    assert scale.float().tolist() == [[448.0, 112.0], [0.125, 0.125]]
    assert scale.dtype == torch.float8_e4m3fn and packed.dtype == torch.uint8
    back = torch.tensor([g0 + g1, [0.0] * 32])  # every value above is an E2M1 value times its step
    assert torch.equal(nvfp4_dequant(packed, scale, gs).float(), back)
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gs}
    assert torch.equal(_ct_decompress("nvfp4", sd), back)


def test_mxfp4_hand_written_example() -> None:
    """Groups of 32 with power-of-two scales, worked by hand: scale 2 ** (floor(log2 amax) - 2), the amax's
    power of two rounded up when its mantissa is >= 1.75; stored as the e8m0 exponent 127 + log2(scale).
    Row 0: amax 3 = 1.5 * 2 -> 2 -> scale 0.5 (e 126). Row 1: amax 3.5 = 1.75 * 2 -> 4 -> scale 1 (e 127).
    Row 2: amax bf16(0.1) = 1.6 * 2^-4 -> scale 2^-6 (e 121); 0.1 / 2^-6 = 6.4 saturates to 6."""
    r0 = [3.0, -1.5, 0.25, 0.75, 1.25, -0.1, 2.5, 0.0] + [0.5] * 24  # / 0.5: 6 -3 .5 1.5 2.5 -.2 5 0, 1 x 24
    r1 = [3.5, -3.5, 0.3, 1.75] + [0.0] * 28  # / 1: 3.5 and 1.75 are ties -> the even codes 4 and 2
    r2 = [0.1, -0.05] + [0.0] * 30  # / 2^-6: 6.4 -> 6, -3.2 -> -3
    w = torch.tensor([r0, r1, r2], dtype=torch.bfloat16)
    # codes r0: 7 13 1 3 4 (2.5 -> 2) 8 (-0.2 -> -0) 6 (5 -> 4) 0, 2..; r1: 6 14 1 4; r2: 7 13
    packed, exps = mxfp4_quant(w)
    assert packed.tolist() == [
        [0xD7, 0x31, 0x84, 0x06] + [0x22] * 12,
        [0xE6, 0x41] + [0x00] * 14,
        [0xD7] + [0x00] * 15,
    ]
    assert exps.tolist() == [[126], [127], [121]] and exps.dtype == torch.uint8
    back = torch.tensor(
        [
            [3.0, -1.5, 0.25, 0.75, 1.0, -0.0, 2.0, 0.0] + [0.5] * 24,
            [4.0, -4.0, 0.5, 2.0] + [0.0] * 28,
            [6 / 64, -3 / 64] + [0.0] * 30,
        ]
    )
    assert torch.equal(mxfp4_dequant(packed, exps).float(), back)
    assert torch.equal(_ct_decompress("mxfp4", {"weight_packed": packed, "weight_scale": exps}), back)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_ragged_groups_refused_like_compressed_tensors(fmt: str, tmp_path: Path) -> None:
    """An input dimension that is not a whole number of groups: compressed-tensors' own group quantizer
    refuses it (its ``_process_group`` raises), so the converter refuses it too, naming the tensor and the
    way out, before writing anything."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from dsv3tools.checkpoint.synth import synthesize
    from dsv3tools.errors import DSV3Error

    args = preset_name_to_scheme("NVFP4A16" if fmt == "nvfp4" else "MXFP4A16", ["Linear"]).weights
    x = torch.randn(4, 40, dtype=torch.bfloat16)  # 40 = 2.5 groups of 16, 1.25 groups of 32
    gs = torch.ones(1) if fmt == "nvfp4" else None
    with pytest.raises(ValueError, match="divisble by the given group_size"):
        quantize(x, torch.ones(4, 3, dtype=torch.bfloat16), None, args, global_scale=gs)
    src = tmp_path / "ragged"
    synthesize(src, preset="tiny", seed=0, dtype="bf16", overrides={"moe_intermediate_size": 40})
    out = tmp_path / "out"
    with pytest.raises(
        DSV3Error, match=rf"mlp\.experts\.\d+\.down_proj: input dimension 40 .* {fmt} group size"
    ):
        convert(src, out, ConvertOptions(fmt), workers=1)
    assert not out.exists() or not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("scope", ["experts", "all"])
def test_fp4_decompressed_by_compressed_tensors(tiny_fp8: Path, tmp_path: Path, fmt: str, scope: str) -> None:
    from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / f"{fmt}-{scope}"
    convert(tiny_fp8, out, ConvertOptions(fmt, int4_scope=scope), workers=1)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = next(iter(QuantizationConfig.model_validate(qc).config_groups.values()))
    comp = NVFP4PackedCompressor if fmt == "nvfp4" else MXFP4PackedCompressor
    ck = Checkpoint(out)
    assert ck.problems() == []
    n = 0
    for w in ck.expected():
        if not (w.linear and w.quantizable) or ck.linear_format(w.name) != fmt:
            continue
        names = ["weight_packed", "weight_scale"] + (["weight_global_scale"] if fmt == "nvfp4" else [])
        sd = {k: ck.get(f"{w.name}.{k}") for k in names}
        theirs = comp.decompress(dict(sd), scheme)["weight"]
        if fmt == "nvfp4":
            ours = nvfp4_dequant(sd["weight_packed"], sd["weight_scale"], sd["weight_global_scale"])
        else:
            ours = mxfp4_dequant(sd["weight_packed"], sd["weight_scale"])
        assert torch.equal(theirs, ours), w.name
        n += 1
    assert n > 0


def test_fp16_overflow_stops(tiny_bf16: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from dsv3tools.errors import DSV3Error

    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = src / Checkpoint(src).weight_map[name]
    t = load_file(shard)
    t[name][3, 5] = 1e6
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(DSV3Error, match="down_proj"):
        convert(src, tmp_path / "out", ConvertOptions("fp16"), workers=1)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))
