"""One step's sampling for a batch: logits processing (penalties, bias, min_tokens), the grammar mask of
constrained rows, then greedy rows by argmax and the rest with per-request seeded generators.

Reported logprobs are the model's own (log_softmax of the raw logits, before any processing or
temperature), as vLLM reports them by default: the chosen token's, and the top-k alternatives where asked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.logits_processors import RowTokens, process_logits
from loraplex.engine.structured import GrammarCompiler, GuidedRows
from loraplex.engine.types import SamplingParams, TopLogprobs


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float]  # of each chosen token
    top_logprobs: list[TopLogprobs]  # per row; empty where not asked
    is_guide_done: list[bool]  # the row's grammar is complete: the request ends here


class Sampler:
    """Holds the per-request state sampling needs across steps: seeded generators and grammar matchers."""

    def __init__(self, device: torch.device, grammars: GrammarCompiler, eos_token_ids: set[int]):
        self.device, self.eos_token_ids = device, eos_token_ids
        self.guided = GuidedRows(grammars)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.guided.release(request_id)

    def sample(self, logits: torch.Tensor, request_ids: list[str], rows: list[RowTokens],
               seeds: list[int]) -> SamplerOutput:
        """logits: [n, V] float32, one row per request, in the order of request_ids."""
        params = [r.params for r in rows]
        logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
        logits = process_logits(logits, rows, self.eos_token_ids)
        guided = [i for i, p in enumerate(params) if p.guide is not None]
        if guided:
            logits = self.guided.mask(logits, guided, [request_ids[i] for i in guided], [params[i].guide for i in guided])
        generators = [self._generator(rid, p, seed) for rid, p, seed in zip(request_ids, params, seeds)]
        tokens = sample(logits, params, generators)  # [n]
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [n]
        token_list = tokens.tolist()
        is_done = [False] * len(rows)
        if guided:
            for i, done in zip(guided, self.guided.advance([request_ids[i] for i in guided], [token_list[i] for i in guided])):
                is_done[i] = done
        return SamplerOutput(token_list, chosen.tolist(), top_logprobs(logprobs, [p.logprobs for p in params]), is_done)

    def _generator(self, request_id: str, params: SamplingParams, seed: int) -> torch.Generator | None:
        if params.is_greedy:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = self._generators[request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return generator


def top_logprobs(logprobs: torch.Tensor, counts: list[int | None]) -> list[TopLogprobs]:
    """logprobs: [n, V] -> per row, its `counts[i]` most likely (token id, logprob) pairs ([] for None/0)."""
    k = max((c or 0 for c in counts), default=0)
    if k == 0:
        return [[] for _ in counts]
    values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)  # [n, k]
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i][: c or 0], values[i][: c or 0])) for i, c in enumerate(counts)]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [n, V] float32 (already processed) -> token ids [n]."""
    tokens = logits.argmax(dim=-1)  # [n]
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        subset = logits.index_select(0, rows)  # [m, V]
        probs = _finite_or_greedy(_filtered_probs(subset, [params[i] for i in sampled_rows]), subset)  # [m, V]
        for j, i in enumerate(sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens


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
