"""NVFP4 / MXFP4 convert: compressed-tensors' own compressors decompress our output to exactly our
dequantization (experts and all scope), the packing matches a hand-written example, fp16 overflow stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.converters.convert import ConvertOptions, convert
from dsv3tools.quant.fp4 import e2m1_codes, fp4_pack, mxfp4_dequant, nvfp4_dequant


def test_fp4_packing_hand_written() -> None:
    x = torch.tensor([[0.5, -1.0, 6.0, -6.0, 0.25, 0.75, 2.5, -0.1]])
    # codes 1, 10, 7, 15, 0, 2, 4, 8 -> bytes low nibble first
    assert fp4_pack(e2m1_codes(x)).tolist() == [[0xA1, 0xF7, 0x20, 0x84]]


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
