"""Triton kernels for FP8 block-scaled and int4 W4A16 linears, each beside its pure-PyTorch twin."""
