"""torchrun worker for tests/test_distributed.py: loads this rank's part of a resharded checkpoint through
``dsv3tools.model.distributed.load_resharded`` and, on rank 0, saves the logits of a fixed batch (full forward,
KV-cache decoding, the MTP module) and the routing counts to ``OUT``.

Usage: ``torchrun --nproc-per-node N tests/dist_worker.py RESHARDED_DIR OUT``
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dsv3tools.model.distributed import load_resharded


def batch(vocab: int) -> torch.Tensor:
    """The fixed input both the worker and the single-process reference use."""
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def run(model) -> dict[str, torch.Tensor]:
    """Everything compared against the single-process model."""
    cfg = model.config
    ids = batch(cfg.vocab_size)
    model.record_routing(True)
    logits, hidden = model(ids, return_hidden=True)
    out = {"logits": logits, "routing": torch.stack(list(model.routing_counts().values()))}
    cache = model.new_cache(2, ids.shape[1])
    steps = [model(ids[:, :8], cache=cache)[:, -1]]
    for pos in range(8, ids.shape[1]):
        steps.append(model(ids[:, pos : pos + 1], start_pos=pos, cache=cache)[:, -1])
    out["decode"] = torch.stack(steps, 1)
    if cfg.num_nextn_predict_layers:
        out["mtp"] = model.mtp_forward(hidden[:, :-1], ids[:, 1:])[0]
    return out


def main() -> None:
    folder, dest = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    model = load_resharded(folder, dtype=torch.float32)
    print(
        f"ready rank {dist.get_rank()} of {dist.get_world_size()}", flush=True
    )  # only rank 0's reaches stdout
    out = run(model)
    if dist.get_rank() == 0:
        torch.save(out, dest)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
