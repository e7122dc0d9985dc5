"""Per-row logits processing before sampling: penalties, logit_bias and min_tokens, vectorized over the
rows that ask for each (rows that ask for nothing cost nothing).

- presence/frequency (OpenAI): logit[t] -= frequency * count[t] + presence * (count[t] > 0), counts over
  the output so far.
- repetition (HF/TGI): for every token seen in prompt + output, logit / p if logit > 0 else logit * p.
- logit_bias: logit[t] += bias.
- min_tokens: EOS and the stop token ids are -inf until min_tokens tokens were generated.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from loraplex.engine.types import SamplingParams


class RowTokens:
    """What a processor needs of one row: its params and its token ids so far."""

    __slots__ = ("params", "prompt_ids", "output_ids")

    def __init__(self, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int]):
        self.params, self.prompt_ids, self.output_ids = params, prompt_ids, output_ids


def process_logits(logits: torch.Tensor, rows: list[RowTokens], eos_token_ids: set[int]) -> torch.Tensor:
    """logits: [n, V] float32 -> processed logits [n, V] (a new tensor when anything applies)."""
    penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    held = [i for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens]
    if not (penalized or biased or held):
        return logits
    logits = logits.clone()
    if penalized:
        _apply_penalties(logits, penalized, [rows[i] for i in penalized])
    if biased:
        _apply_logit_bias(logits, biased, [rows[i].params for i in biased])
    if held:
        _ban_stop_tokens(logits, held, [rows[i].params for i in held], eos_token_ids)
    return logits


def token_counts(id_lists: list[Seq[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """id_lists: m lists of token ids -> counts [m, V] (int32) of each token id in each list."""
    longest = max((len(ids) for ids in id_lists), default=0)
    padded = torch.full((len(id_lists), max(longest, 1)), vocab_size, dtype=torch.long)  # pad -> extra column
    for j, ids in enumerate(id_lists):
        if ids:
            padded[j, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    counts = torch.zeros((len(id_lists), vocab_size + 1), dtype=torch.int32)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size].to(device, non_blocking=True)  # [m, V]


def _apply_penalties(logits: torch.Tensor, row_index: list[int], rows: list[RowTokens]) -> None:
    vocab, device = logits.shape[1], logits.device
    index = torch.tensor(row_index, device=device)
    subset = logits.index_select(0, index)  # [m, V]
    output_counts = token_counts([r.output_ids for r in rows], vocab, device).to(subset.dtype)  # [m, V]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device).unsqueeze(1)  # [m, 1]
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device).unsqueeze(1)
    subset -= frequency * output_counts + presence * (output_counts > 0).to(subset.dtype)
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=device).unsqueeze(1)
    if bool((repetition != 1.0).any()):
        seen = token_counts([list(r.prompt_ids) + list(r.output_ids) for r in rows], vocab, device) > 0  # [m, V]
        scaled = torch.where(subset > 0, subset / repetition, subset * repetition)
        subset = torch.where(seen, scaled, subset)
    logits.index_copy_(0, index, subset)


def _apply_logit_bias(logits: torch.Tensor, row_index: list[int], params: list[SamplingParams]) -> None:
    rows = [i for i, p in zip(row_index, params) for _ in p.logit_bias]
    tokens = [t for p in params for t, _ in p.logit_bias]
    biases = [b for p in params for _, b in p.logit_bias]
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def _ban_stop_tokens(logits: torch.Tensor, row_index: list[int], params: list[SamplingParams],
                     eos_token_ids: set[int]) -> None:
    vocab = logits.shape[1]
    pairs = [(i, t) for i, p in zip(row_index, params) for t in eos_token_ids | set(p.stop_token_ids) if t < vocab]
    if pairs:
        rows, tokens = zip(*pairs)
        logits[torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)] = float("-inf")
