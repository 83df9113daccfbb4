"""Tensor- and expert-parallel replacements for the model's modules (used by :mod:`dsv3tools.model.distributed`).

Every rank sees every token (activations are replicated after each all-reduce):

* :class:`RowParallelLinear` (``o_proj``, dense ``down_proj``): the rank's input-column slice, then an
  all-reduce of the partial output;
* :class:`VocabParallelEmbedding`: the rank's vocab rows; ids outside them look up zeros; all-reduce;
* :class:`ColumnParallelHead` (``lm_head``, MTP ``shared_head.head``): the rank's vocab rows, then an
  all-gather of the logits along the vocab dim;
* :class:`ExpertParallelMoE`: the router runs everywhere; each (token, expert) pair is computed once, on
  replica ``(token index + call counter) mod logcnt[e]`` of its expert (the same choice on every rank), by
  the rank owning that physical slot; the routed partial sum plus the rank's slice of the shared expert
  is all-reduced once.

Column-parallel linears (``q_b_proj``, ``kv_b_proj``, ``gate/up_proj``) need no wrapper: the model reads
the local head count from the weights. Reductions run in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3tools.config import ModelConfig
from dsv3tools.converters.placement import derive
from dsv3tools.model.linear import Linear, linear
from dsv3tools.model.moe import MLP, MoE, grouped
from dsv3tools.model.transformer import Embedding


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks (in float32), in ``x``'s dtype."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    y = x.float().contiguous()
    dist.all_reduce(y)
    return y.to(x.dtype)


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along the last dim (rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


class RowParallelLinear(Linear):
    """A linear holding the rank's slice of the input dim; the partial outputs are summed over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(linear(x, self))


class ColumnParallelHead(Linear):
    """A head holding the rank's vocab rows; logits are gathered over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(linear(x, self))


class VocabParallelEmbedding(Embedding):
    """The rank's rows ``start .. start + rows`` of the embedding table."""

    def __init__(self, vocab: int, dim: int, start: int):
        super().__init__(vocab, dim)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.weight.device) - self.start
        outside = (ids < 0) | (ids >= self.weight.shape[0])
        out = F.embedding(ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce_sum(out)


class ExpertParallelMoE(MoE):
    """A MoE holding the rank's physical expert slots (``slots.{p}``) and its shared-expert slice."""

    def __init__(self, cfg: ModelConfig, phy2log: list[int], rank: int, world: int):
        super().__init__(cfg, expert_ids=[])
        p = len(phy2log)
        per = p // world
        self.lo, self.hi = rank * per, (rank + 1) * per
        self.slots = nn.ModuleDict(
            {
                str(s): MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.quant.block)
                for s in range(self.lo, self.hi)
            }
        )
        cnt, l2p = derive(phy2log, cfg.n_routed_experts)
        logcnt, log2phy = torch.from_numpy(cnt), torch.from_numpy(l2p)
        self.register_buffer("logcnt", logcnt, persistent=False)
        self.register_buffer("log2phy", log2phy, persistent=False)
        self.calls = 0

    def choose_slots(self, idx: torch.Tensor) -> torch.Tensor:
        """Physical slot of each (token, choice) pair: replica ``(token + calls) mod logcnt``."""
        n, k = idx.shape
        tok = torch.arange(n, device=idx.device).unsqueeze(1).expand(n, k)
        rep = (tok + self.calls) % self.logcnt.to(idx.device)[idx]
        return self.log2phy.to(idx.device)[idx, rep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base MoE over this rank's slots and shared-expert slice, summed over ranks."""
        return all_reduce_sum(super().forward(x))

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The (token, expert) pairs whose chosen replica lives on this rank; the rest contribute zero."""
        slot = self.choose_slots(idx)
        self.calls += 1
        local = torch.where((slot >= self.lo) & (slot < self.hi), slot - self.lo, -1)
        return grouped(x, local, weights, self.hi - self.lo, lambda j, xs: self.slots[str(self.lo + j)](xs))
