"""The torch GGML encoders (``converters/gguf/encode.py``) write exactly the bytes of ``gguf.quants.quantize``
for the same float32 input, for every type: random data, exact rounding ties and their neighbours, zeros and
all-zero blocks, negative zeros, huge and tiny (subnormal) values, FP8-dequantized values, and random bit
patterns for the float types (NaN included there, where gguf's rule is defined)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dsv3tools.converters.gguf import encode as enc

Q = enc.Q
ALL = [t.name for t in enc.TYPES]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's own overflow warnings on extremes


def _gguf(x: np.ndarray, qtype: Q) -> np.ndarray:
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(x, qtype)).reshape(-1).view(np.uint8)


def _same(x: np.ndarray, qtype: Q) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    ours = enc.encode(torch.from_numpy(x.copy()), qtype).numpy()
    ref = _gguf(x, qtype)
    assert ours.shape == ref.shape
    diff = np.flatnonzero(ours != ref)
    assert diff.size == 0, f"{qtype.name}: {diff.size} bytes differ, first at {diff[:8]}"


def _ties(rng: np.random.Generator) -> np.ndarray:
    """Blocks whose scale is exactly 1 for Q8_0 (amax 127), so ``x * id`` is ``x``: every half-integer, and
    its float32 neighbours, as a value to round."""
    halves = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    vals = np.concatenate([halves, np.nextafter(halves, np.inf), np.nextafter(halves, -np.inf)])
    vals = np.concatenate([vals, np.float32([0.5 - 2**-25, -(0.5 - 2**-25), 2**-25, 0.0, -0.0])])
    vals = rng.permutation(np.resize(vals, (len(vals) + 30) // 31 * 31)).reshape(-1, 31)
    return np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], axis=1)


def _edge_blocks(rng: np.random.Generator) -> np.ndarray:
    """All-zero and negative-zero blocks, single non-zeros, huge and tiny magnitudes, equal-magnitude
    maxima of both signs (the sign of Q4_0's max), constant blocks (Q4_1's ``d`` = 0)."""
    rows = [
        np.zeros(32),
        -np.zeros(32),
        np.eye(32)[3] * -2.5,
        np.full(32, 7.25),
        np.full(32, -1e-3),
        np.r_[np.full(16, 3.0), np.full(16, -3.0)],
        np.r_[np.full(16, -3.0), np.full(16, 3.0)],
        rng.standard_normal(32) * 3e38 / 4,
        rng.standard_normal(32) * 1e-30,
        rng.standard_normal(32) * 1e-37,  # d subnormal, 1 / d finite or not: gguf's path
        rng.standard_normal(32) * 1e-42,  # subnormal inputs
        np.r_[np.full(31, 0.0), 1e-45],
    ]
    return np.asarray(rows, dtype=np.float32)


def _fp8_values(rng: np.random.Generator) -> np.ndarray:
    """float32(code) * scale as the FP8 dequantization produces them: many repeated magnitudes (ties)."""
    codes = torch.from_numpy(rng.integers(0, 256, size=(64, 256), dtype=np.uint8))
    codes[codes.bitwise_and(0x7F) == 0x7F] = 0  # no NaN codes
    vals = codes.view(torch.float8_e4m3fn).float() * torch.tensor(1.7e-4)
    return vals.numpy()


@pytest.mark.parametrize("name", ALL)
def test_random_and_scaled_data(name: str) -> None:
    rng = np.random.default_rng(0)
    qtype = Q[name]
    for scale in (1.0, 1e-3, 1e4):
        _same(rng.standard_normal((96, 512)).astype(np.float32) * np.float32(scale), qtype)
    _same(rng.uniform(-1, 1, (8, 64)).astype(np.float32), qtype)  # another shape, both signs


@pytest.mark.parametrize("name", ALL)
def test_ties_zeros_and_extremes(name: str) -> None:
    rng = np.random.default_rng(1)
    qtype = Q[name]
    _same(_ties(rng), qtype)
    _same(_edge_blocks(rng), qtype)
    _same(_fp8_values(rng), qtype)
    small = rng.integers(-9, 10, size=(64, 32)).astype(np.float32) / np.float32(2)  # many equal values
    _same(small, qtype)


@pytest.mark.parametrize("name", ["F16", "BF16", "F32"])
def test_float_types_on_random_bit_patterns(name: str) -> None:
    """Every float32 class: normals, subnormals, infinities, overflow to inf, NaNs of both signs."""
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    _same(x.reshape(-1, 32), Q[name])
    nan_free = x[~np.isnan(x)][:4096]
    _same(nan_free.reshape(-1, 32), Q[name])


def test_non_finite_scales_fall_back_to_gguf(monkeypatch) -> None:
    """A block whose scale's inverse overflows goes through gguf's encoder (so its bytes agree)."""
    calls = []
    real = enc._reference
    monkeypatch.setattr(enc, "_reference", lambda *a: calls.append(a[1]) or real(*a))
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    _same(x, Q.Q8_0)
    assert calls == []
    x[1, :32] *= np.float32(1e-41)
    _same(x, Q.Q8_0)
    assert calls == [Q.Q8_0]


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])
def test_types_without_a_torch_encoder_go_through_gguf(name: str) -> None:
    """Any other type gguf can write is encoded by gguf itself (so still byte-equal); one it cannot write
    raises gguf's own NotImplementedError."""
    rng = np.random.default_rng(6)
    _same(rng.standard_normal((4, 512)).astype(np.float32), Q[name])
    with pytest.raises(NotImplementedError):
        enc.encode(torch.zeros(256), Q.Q4_K)


def test_byte_counts_and_bad_input() -> None:
    assert enc.type_bytes(7168 * 2, Q.Q8_0) == 7168 * 2 // 32 * 34
    assert [enc.type_bytes(32, t) for t in enc.BLOCK_TYPES] == [34, 18, 20, 22, 24]
    with pytest.raises(ValueError):
        enc.type_bytes(48, Q.Q4_0)
    with pytest.raises(TypeError):
        enc.encode(torch.zeros(32, dtype=torch.float64), Q.Q8_0)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_1"])
def test_export_in_small_slabs_and_threads_writes_gguf_encoding(
    name: str, tiny_fp8, tmp_path, monkeypatch
) -> None:
    """Slabs far smaller than an FP8 scale block (8 rows of 128), two worker threads: every weight of the
    export is gguf's encoding of its float32 values, and the file equals the one-thread default-slab export."""
    import gguf

    from dsv3tools.converters.gguf import export as export_mod
    from dsv3tools.converters.gguf import source
    from dsv3tools.converters.gguf.plan import GGUFOptions

    kind = name.lower()
    plain = export_mod.export_gguf(tiny_fp8, tmp_path / "plain", GGUFOptions(gguf_type=kind))["files"][0]
    monkeypatch.setattr(source, "SLAB_ELEMENTS", 1024)
    small = export_mod.export_gguf(tiny_fp8, tmp_path / "small", GGUFOptions(gguf_type=kind, workers=2))
    with open(plain, "rb") as a, open(small["files"][0], "rb") as b:
        assert a.read() == b.read()
    ck, planned = export_mod.plan_gguf(tiny_fp8, GGUFOptions(gguf_type=kind))
    values = export_mod._Values(ck)
    tensors = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    checked = 0
    for t in planned:
        if t.qtype != Q[name] or t.part is not None:
            continue
        w = np.stack([values.whole(s).numpy() for s in t.sources])
        assert np.array_equal(np.asarray(tensors[t.name].data).reshape(-1), _gguf(w, Q[name])), t.name
        checked += 1
    ck.close()
    assert checked > 10


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_input_is_encoded_as_its_float32_values(name: str, dtype: str) -> None:
    """bf16 / f16 rows (the embedding and head as stored) give the bytes of their float32 values."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32) * 3).to(getattr(torch, dtype))
    x[0, :32] = 0
    x[1, :32] = x[1, 0]
    ours = enc.encode(x, Q[name]).numpy()
    assert np.array_equal(ours, _gguf(x.float().numpy(), Q[name]))


def test_direct_sink_writes_exactly_the_bytes_given(tmp_path) -> None:
    """O_DIRECT appends after a header of odd length: pieces aligned like their file offsets (written straight
    from them), others not (copied through the bounce block), tiny ones, padding; then the exact length."""
    from dsv3tools.converters.gguf import sink as sink_mod

    path = tmp_path / "f.bin"
    head = bytes(range(256)) * 21 + b"xyz"  # 5379 bytes: the data starts mid-block
    path.write_bytes(head)
    fd = sink_mod.open_direct(path)
    if fd is None:
        pytest.skip("no O_DIRECT on this file system")
    rng = np.random.default_rng(5)
    buffers, expect, released = sink_mod.Buffers(4), [head], []
    try:
        sink = sink_mod.DirectSink(path, fd)
        for n in (70_000, 3, 4096, 12_288 + 17, 1, 200_000, 31):
            data = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
            if n % 2:  # through a buffer aligned like its offset, handed back when written
                out = buffers.take(n, sink.pos)
                out.copy_(data)
                sink.write(out, lambda out=out: released.append(out.numel()))
            else:
                sink.write(data.clone())
            expect.append(data.numpy().tobytes())
        sink.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(expect)
    assert sorted(released) == [1, 3, 31, 12_305]


def test_page_cache_fallback_writes_the_same_file(tiny_fp8, tmp_path, monkeypatch) -> None:
    from dsv3tools.converters.gguf import export as export_mod
    from dsv3tools.converters.gguf.plan import GGUFOptions

    direct = export_mod.export_gguf(tiny_fp8, tmp_path / "direct", GGUFOptions(gguf_type="q8_0", workers=2))
    monkeypatch.setattr(export_mod, "open_direct", lambda path: None)
    cached = export_mod.export_gguf(tiny_fp8, tmp_path / "cached", GGUFOptions(gguf_type="q8_0", workers=2))
    with open(direct["files"][0], "rb") as a, open(cached["files"][0], "rb") as b:
        assert a.read() == b.read()
