"""Run under ``TRITON_INTERPRET=1`` by tests/test_triton_model.py: the logits of a checkpoint through the
Triton kernels (interpreted on CPU) and through their PyTorch twins, saved to ``OUT``.

Usage: ``TRITON_INTERPRET=1 python tests/triton_model_worker.py CKPT OUT``
"""

from __future__ import annotations

import sys

import torch

from dsv3tools.model.api import load_model


def main() -> None:
    ckpt, dest = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ids = torch.randint(5, 260, (1, 6), generator=torch.Generator().manual_seed(3))
    out = {}
    with torch.inference_mode():
        for backend in ("triton", "torch"):
            out[backend] = load_model(ckpt, dtype=torch.float32, backend=backend)(ids)
    torch.save(out, dest)


if __name__ == "__main__":
    main()
