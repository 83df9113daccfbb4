"""Quantization formulas, one home for every format: the pure-PyTorch reference formulas (``reference``:
FP8 blocks, int4 groups), the exact per-block FP8 tables of the CPU hot path (``fp8_lut``) and the band-wise
encoders the converters stream through (``bands``). The kernels' twins live in ``dsv3tools.kernels``."""
