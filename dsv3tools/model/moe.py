"""Feed-forward blocks: the SwiGLU MLP, the noaux_tc group-limited gate and the MoE with its shared expert.

Routed experts run grouped: token-expert pairs are sorted by expert, each active expert gathers its tokens
with ``index_select``, runs one batched MLP and scatters the weighted result back with ``index_add``. The
MoE holds an explicit ``{global expert id: MLP}`` table, so an expert-parallel rank can hold a subset.

After :meth:`MoE.stack_experts` (``load_model(..., materialize=True)``) the experts' weights live in two
stacked tensors, ``gate_up [E, 2 * inter, hidden]`` (gate and up fused into one matmul) and
``down [E, hidden, inter]``, and the per-expert modules hold views of them; the routed computation then
runs on the stacked tensors (one fused matmul per active expert, no per-token bookkeeping for one token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3tools.config import ModelConfig
from dsv3tools.model.linear import Linear, dense

GROUP_SCORE_TOP = 2  # noaux_tc: a group's score is the sum of its 2 best biased scores


def grouped(
    x: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    n_groups: int,
    apply: Callable[[int, torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * apply(keys[t, j], x[t])`` over the pairs with ``keys >= 0``, one
    ``apply`` call per key on all its tokens at once: pairs sorted by key (stable), rows gathered with
    ``index_select``, results scattered back with ``index_add``. ``apply`` returning None adds nothing."""
    k = keys.shape[1]
    flat = keys.flatten()
    sel = torch.nonzero(flat >= 0).flatten()
    out = torch.zeros_like(x)
    if sel.numel() == 0:
        return out
    order = sel[torch.argsort(flat[sel], stable=True)]
    token = order // k
    w = weights.flatten().index_select(0, order).to(x.dtype).unsqueeze(1)
    counts = torch.bincount(flat[order], minlength=n_groups).tolist()
    start = 0
    for g, cnt in enumerate(counts):
        if cnt == 0:
            continue
        stop = start + cnt
        rows = token[start:stop]
        y = apply(g, x.index_select(0, rows))
        if y is not None:
            out.index_add_(0, rows, y * w[start:stop])
        start = stop
    return out


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, block: tuple[int, int]):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, block)
        self.up_proj = Linear(hidden, inter, block)
        self.down_proj = Linear(inter, hidden, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """noaux_tc router (SPEC sec. 4): sigmoid scores, bias-corrected group-limited top-k selection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.register_buffer("weight", None)
        self.register_buffer("e_score_correction_bias", None)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid router scores ``[N, E]`` in float32."""
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))

    def forward(self, x: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, H]`` -> (weights float32 ``[N, k]``, expert ids ``[N, k]``); the weights carry
        ``routed_scaling_factor`` unless ``scaled`` is False (the float16 forward, see :class:`MoE`)."""
        s = self.scores(x)
        biased = s.detach() + self.e_score_correction_bias.float()
        n = biased.shape[0]
        if self.n_group > 1:
            grouped = biased.view(n, self.n_group, -1)
            top = min(GROUP_SCORE_TOP, grouped.shape[-1])  # a cut-down checkpoint may have 1 expert per group
            group_score = grouped.topk(top, dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            mask = torch.ones(n, self.n_group, dtype=torch.bool, device=x.device).scatter(1, keep, False)
            biased = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(n, -1)
        idx = biased.topk(self.topk, dim=-1).indices
        w = s.gather(1, idx)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return (w * self.scaling if scaled else w), idx


class MoE(nn.Module):
    """Routed experts (grouped by expert) plus the shared expert; optional routing statistics.

    In float16 the output is ``(routed * s + shared) / s`` with ``s = routed_scaling_factor``: the routed
    sum is left unscaled and the shared expert's output divided by ``s``, as vLLM's DeepSeek model does, so
    the residual stream stays in units of ``1 / s`` (see :class:`~dsv3tools.model.transformer.Block`)."""

    def __init__(self, cfg: ModelConfig, expert_ids: list[int] | None = None):
        super().__init__()
        h, blk = cfg.hidden_size, cfg.quant.block
        self.gate = Gate(cfg)
        ids = list(range(cfg.n_routed_experts)) if expert_ids is None else list(expert_ids)
        self.experts = nn.ModuleDict({str(e): MLP(h, cfg.moe_intermediate_size, blk) for e in ids})
        self.shared_experts = (
            MLP(h, cfg.moe_intermediate_size * cfg.n_shared_experts, blk) if cfg.n_shared_experts else None
        )
        self.record = False
        self.counts = torch.zeros(cfg.n_routed_experts, dtype=torch.int64)
        self.inter = cfg.moe_intermediate_size
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up, down) after stack_experts
        self.slot: list[int] = []  # global expert id -> row of the stacked tensors (-1: not held)

    def stack_experts(self, dtype: torch.dtype) -> None:
        """Dequantize the held experts once into stacked ``dtype`` tensors; the expert modules keep views."""
        if not self.experts:
            return
        ids = sorted(int(e) for e in self.experts)
        inter, hidden = self.experts[str(ids[0])].gate_proj.weight_shape_2d()
        dev = self.gate.weight.device
        gate_up = torch.empty(len(ids), 2 * inter, hidden, dtype=dtype, device=dev)
        down = torch.empty(len(ids), hidden, inter, dtype=dtype, device=dev)
        for j, e in enumerate(ids):
            mlp = self.experts[str(e)]
            mlp.gate_proj.materialize(dtype, gate_up[j, :inter])
            mlp.up_proj.materialize(dtype, gate_up[j, inter:])
            mlp.down_proj.materialize(dtype, down[j])
        self.stacked, self.inter = (gate_up, down), inter
        self.slot = [-1] * self.gate.n_experts
        for j, e in enumerate(ids):
            self.slot[e] = j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        fp16 = x.dtype == torch.float16 and self.gate.scaling != 1.0
        weights, idx = self.gate(x, scaled=not fp16)
        if self.record:
            self.counts += torch.bincount(idx.flatten().cpu(), minlength=self.counts.numel())
        out = self._routed(x, weights, idx)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            out = out + (shared * (1.0 / self.gate.scaling) if fp16 else shared)
        return out.view(shape)

    def _stacked_expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert at stacked row ``j`` on ``x [N, H]``: one fused gate+up matmul, then down."""
        gate_up, down = self.stacked
        h = dense(x, gate_up[j])
        return dense(F.silu(h[:, : self.inter]) * h[:, self.inter :], down[j])

    def _routed_one(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One token (decode): its k experts in ascending id order, summed like the grouped path."""
        out = torch.zeros_like(x)
        pairs = sorted(zip(idx[0].tolist(), weights[0].to(x.dtype).unbind(0), strict=True))
        for e, w in pairs:
            j = self.slot[e]
            if j >= 0:
                out = out + self._stacked_expert(j, x) * w
        return out

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None and x.shape[0] == 1:
            return self._routed_one(x, weights, idx)
        local = dict(self.experts.items())  # a rank may hold a subset of the experts

        def expert(e: int, xs: torch.Tensor) -> torch.Tensor | None:
            if self.stacked is not None and self.slot[e] >= 0:
                return self._stacked_expert(self.slot[e], xs)
            mlp = local.get(str(e))
            return None if mlp is None else mlp(xs)

        return grouped(x, idx, weights, self.gate.n_experts, expert)
