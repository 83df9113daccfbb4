"""The lm-eval adapter: :class:`DSV3LM`, a ``TemplateLM`` over the built-in forward, registered as ``dsv3``.

Loglikelihoods follow HFLM exactly: contexts are encoded with BOS prepended, requests are sorted by
length (``Collator``) and right-padded into batches, one forward gives full-sequence logits,
log-softmax is taken in float32 and the continuation tokens' log-probs are summed. Multiple-choice
requests sharing a context and differing only in a one-token continuation reuse one forward (the
Collator's ``group_by="contexts"`` cache, as in HFLM). ``generate_until`` decodes greedily with the KV
cache; ``loglikelihood_rolling`` (perplexity) uses lm-eval's disjoint rolling windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsv3tools.checkpoint.tokenizer import load_tokenizer
from dsv3tools.errors import DSV3Error

DEFAULT_MAX_GEN_TOKS = 256


@register_model("dsv3")
class DSV3LM(TemplateLM):
    """lm-eval model over ``dsv3tools.load_model``; pass ``pretrained=DIR`` or an already loaded ``model``."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        tokenizer: str | Path | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        if model is None and pretrained is None:
            raise DSV3Error("DSV3LM needs pretrained=DIR or model=<loaded Transformer>")
        tok_path = tokenizer or getattr(model, "tokenizer_path", None) or pretrained
        if tok_path is None:
            raise DSV3Error(
                "DSV3LM: no tokenizer; pass tokenizer=DIR (a folder with tokenizer.json or tiktoken.model)"
            )
        self.tokenizer_ = load_tokenizer(tok_path)  # before the weights: a missing file fails fast
        if model is None:
            from dsv3tools.model.api import load_model

            model = load_model(pretrained, device=device, dtype=_torch_dtype(dtype))
            dequantize_small(model)
        self.model = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.forwards = 0

    # ---- tokenization --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids; BOS is prepended like HFLM (unless asked not to, or the text already starts with it)."""
        tk = self.tokenizer_
        if add_special_tokens is None:
            add_bos = tk.add_bos and not (tk.bos_text and string.startswith(tk.bos_text))
        else:
            add_bos = bool(add_special_tokens) and tk.add_bos
        return tk.encode(string, add_bos)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer_.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, batch: list[list[int]]) -> torch.Tensor:
        """float32 log-softmax ``[B, T, V]`` of right-padded token lists (padding never attended by real tokens)."""
        width = max(len(x) for x in batch)
        pad = self.tokenizer_.eos_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], dtype=torch.long)
        self.forwards += 1
        logits = self.model(ids.to(self.model.device))
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy decode) per request, in request order."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        res: list[tuple[float, bool]] = []
        for chunk in collator.get_batched(n=self.batch_size):
            inps = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            logprobs = self._logprobs(inps)
            for (req_str, ctx, cont), inp, lp in zip(chunk, inps, logprobs, strict=True):
                sel = lp[len(inp) - len(cont) : len(inp)].unsqueeze(0)  # [1, cont, V]
                greedy = sel.argmax(-1)
                for rs, cont_toks, lps in collator.get_cache(
                    req_str=req_str, cxt_toks=ctx, cont_toks=cont, logits=sel
                ):
                    ct = torch.tensor(cont_toks, dtype=torch.long).unsqueeze(0)
                    is_greedy = bool((greedy[:, -ct.shape[1] :] == ct).all())
                    ll = float(torch.gather(lps, 2, ct.unsqueeze(-1)).sum())
                    res.append((ll, is_greedy))
                    if rs is not None:
                        self.cache_hook.add_partial("loglikelihood", rs, (ll, is_greedy))
        return collator.get_original(res)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text (BOS-prefixed disjoint windows of ``max_length``)."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, EOS or ``max_gen_toks``."""
        from dsv3tools.evals.mtp import greedy_generate

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1) :]
            new, _ = greedy_generate(
                self.model, ids, max_new, eos_id=self.eot_token_id, stop=self._stopper(until)
            )
            text = self.tok_decode(new)
            for s in until:
                text = text.split(s)[0] if s else text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _stopper(self, until: list[str]):
        def stop(ids: list[int]) -> bool:
            text = self.tok_decode(ids)
            return any(s and s in text for s in until)

        return stop


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise DSV3Error(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    return names[dtype]


def dequantize_small(model: Any, max_bytes: int = 2**30) -> bool:
    """Replace FP8/int4 linear weights by their dequantized ``model.dtype`` values once, instead of per use,
    when they fit in ``max_bytes``. Numerically identical to the dequantizing backend (same function, same
    rounding); a no-op for big models or other backends. True if it dequantized."""
    from dsv3tools.model.linear import Linear

    layers = [
        m for m in model.modules() if isinstance(m, Linear) and m.fmt in ("fp8", "int4", "nvfp4", "mxfp4")
    ]
    if getattr(model, "backend", "dequant") != "dequant" or getattr(model, "streamer", None) is not None:
        return False
    size = sum(m.in_features * m.out_features for m in layers) * torch.finfo(model.dtype).bits // 8
    if not layers or size > max_bytes:
        return False
    for m in layers:
        m.materialize(model.dtype)
    return True
