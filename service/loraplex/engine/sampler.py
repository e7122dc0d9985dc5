"""Batched sampling: greedy rows by argmax, the rest with per-request seeded generators."""
from __future__ import annotations

import torch

from loraplex.engine.types import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [n, V] float32 -> (token ids [n], logprob of each chosen token under the model [n])."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    tokens = logits.argmax(dim=-1)  # [n]
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        subset = logits.index_select(0, rows)  # [m, V]
        probs = _finite_or_greedy(_filtered_probs(subset, [params[i] for i in sampled_rows]), subset)  # [m, V]
        for j, i in enumerate(sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [n]
    return tokens, chosen


def _finite_or_greedy(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rows whose probabilities are not finite (overflowing logits, a degenerate temperature) become
    one-hot on their argmax: that request decodes greedily instead of failing the whole batch's step."""
    is_bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)  # [m, 1]
    greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)  # [m, V]
    return torch.where(is_bad, greedy, probs)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) per row. logits: [m, V] -> probs [m, V]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperature
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [m, V]
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)  # [1, V]
    remove = ranks >= top_k.unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    cumulative = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
    remove |= cumulative >= top_p
    remove[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)
