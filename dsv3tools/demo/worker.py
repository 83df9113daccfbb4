"""torchrun worker of ``dsv3tools demo``: loads this rank's part of a resharded checkpoint and, on rank 0,
saves the float32 logits of the given token ids.

Usage: ``torchrun --nproc-per-node N -m dsv3tools.demo.worker RESHARDED_DIR IDS.pt OUT.pt``
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> None:
    from dsv3tools.model.distributed import load_resharded

    folder, ids_file, dest = sys.argv[1:4]
    torch.set_num_threads(1)
    model = load_resharded(folder, dtype=torch.float32)
    ids = torch.load(ids_file)
    with torch.inference_mode():
        logits = model(ids)
    if dist.get_rank() == 0:
        torch.save(logits, dest)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
