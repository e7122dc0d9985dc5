"""Owns every device tensor: turns a ScheduledBatch into inputs, runs the model, samples."""
from __future__ import annotations

import itertools

import torch

from loraplex.engine.attention import AttentionMetadata, PrefillGroup
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.lora_ops import LoraBatch, build_lora_batch
from loraplex.engine.merge import MergeManager
from loraplex.engine.model import ForwardBatch, LlamaForServing
from loraplex.engine.logits_processors import RowTokens
from loraplex.engine.sampler import Sampler, SamplerOutput, top_logprobs
from loraplex.engine.scheduler import ScheduledBatch
from loraplex.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForServing, kv_cache: KVCache, merge: MergeManager, device: torch.device,
                 sampler: Sampler):
        self.model, self.kv_cache, self.merge, self.device = model, kv_cache, merge, device
        self.sampler = sampler

    def run(self, batch: ScheduledBatch) -> tuple[SamplerOutput, dict[str, list]]:
        """The sampled token (+ logprobs) for each of batch.seqs, in that order, and the prompt logprobs
        of the prefilled sequences that asked for them (request id -> per prompt token after the first)."""
        for src, dst, length in batch.row_moves:
            self.kv_cache.move_row(src, dst, length)
        input_ids, forward_batch = self._prepare(batch)
        logits = self.model(input_ids, forward_batch, self.kv_cache)  # [num_seqs + prompt positions, V]
        seqs = batch.seqs
        rows = [RowTokens(s.params, s.prompt_ids, s.output_ids) for s in seqs]
        output = self.sampler.sample(logits[: len(seqs)], [s.request_id for s in seqs], rows, [s.seed for s in seqs])
        return output, prompt_logprobs(logits[len(seqs):], _wanting_prompt_logprobs(batch))

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardBatch]:
        decode, prefill = batch.decode_seqs, batch.prefill_seqs
        token_ids = [s.last_token for s in decode] + list(itertools.chain.from_iterable(s.prompt_ids for s in prefill))
        positions = [s.num_tokens - 1 for s in decode] + list(
            itertools.chain.from_iterable(range(len(s.prompt_ids)) for s in prefill)
        )
        logits_indices, start, prompt_positions = list(range(len(decode))), len(decode), []
        for seq in prefill:
            if seq.params.prompt_logprobs is not None:  # every position but the last predicts a prompt token
                prompt_positions += range(start, start + len(seq.prompt_ids) - 1)
            start += len(seq.prompt_ids)
            logits_indices.append(start - 1)
        logits_indices += prompt_positions  # after the sampled rows: run() splits them off
        lora = self._lora_batch(decode, prefill)
        forward_batch = ForwardBatch(
            positions=self._tensor(positions),
            attention=self._attention_metadata(decode, prefill),
            lora=lora,
            logits_indices=self._tensor(logits_indices),
        )
        return self._tensor(token_ids), forward_batch

    def _lora_batch(self, decode: list[Sequence], prefill: list[Sequence]) -> LoraBatch:
        """Each token's adapter slot; with an adapter merged, its tokens need none and all others
        get the compensation pass (-merged delta) as well."""
        merged = self.merge.merged_slot
        own = lambda s: 0 if s.slot == merged else s.slot  # noqa: E731
        compensation = None
        if merged is not None:
            extra = lambda s: 0 if s.slot == merged else self.merge.compensation_slot  # noqa: E731
            compensation = self._build_lora([extra(s) for s in decode], [(len(s.prompt_ids), extra(s)) for s in prefill])
        return self._build_lora([own(s) for s in decode], [(len(s.prompt_ids), own(s)) for s in prefill], compensation)

    def _build_lora(self, decode_slots, prefill_runs, compensation=None) -> LoraBatch:
        pool = self.merge.pool
        return build_lora_batch(decode_slots, prefill_runs, self.device, pool.num_slots, pool.max_rank, compensation)

    def _attention_metadata(self, decode: list[Sequence], prefill: list[Sequence]) -> AttentionMetadata:
        write_index = decode_mask = decode_lengths = None
        max_decode_len = 0
        if decode:
            lengths = [s.num_tokens for s in decode]  # cache length after this step's write
            max_decode_len = max(lengths)
            write_index = self._decode_write_index(lengths)
            columns = torch.arange(max_decode_len, device=self.device)
            decode_lengths = self._tensor(lengths)
            decode_mask = (columns.unsqueeze(0) < decode_lengths.unsqueeze(1))[:, None, None, :]
        return AttentionMetadata(
            num_decode=len(decode),
            decode_write_index=write_index,
            decode_mask=decode_mask,  # [n, 1, 1, L]
            decode_lengths=decode_lengths,
            max_decode_len=max_decode_len,
            prefill_groups=self._prefill_groups(len(decode), prefill),
        )

    def _decode_write_index(self, lengths: list[int]) -> torch.Tensor:
        """Flat index into cache.view(-1, hd) for each (decode row, kv head): [n * Hkv]."""
        num_kv, max_len = self.kv_cache.num_kv_heads, self.kv_cache.max_model_len
        rows = torch.arange(len(lengths)).unsqueeze(1)  # [n, 1]
        heads = torch.arange(num_kv).unsqueeze(0)  # [1, Hkv]
        positions = torch.tensor(lengths).unsqueeze(1) - 1  # [n, 1]
        return ((rows * num_kv + heads) * max_len + positions).reshape(-1).to(self.device, non_blocking=True)

    def _prefill_groups(self, token_start: int, prefill: list[Sequence]) -> tuple[PrefillGroup, ...]:
        groups = []
        for length, members in itertools.groupby(prefill, key=lambda s: len(s.prompt_ids)):
            members = list(members)
            rows = self._tensor([s.row for s in members])
            groups.append(PrefillGroup(token_start, len(members), length, rows))
            token_start += length * len(members)
        return tuple(groups)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _wanting_prompt_logprobs(batch: ScheduledBatch) -> list[Sequence]:
    return [s for s in batch.prefill_seqs if s.params.prompt_logprobs is not None]


def prompt_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> dict[str, list]:
    """logits: [sum(P_i - 1), V], seq i's positions 0..P_i-2 in order -> request id -> for each prompt
    token after the first, (its logprob, its position's top alternatives)."""
    result, start = {}, 0
    for seq in seqs:
        num = len(seq.prompt_ids) - 1
        logprobs = torch.log_softmax(logits[start : start + num], dim=-1)  # [P-1, V]
        targets = torch.tensor(seq.prompt_ids[1:], device=logits.device).unsqueeze(1)  # [P-1, 1]
        chosen = logprobs.gather(1, targets).squeeze(1).tolist() if num else []
        top = top_logprobs(logprobs, [seq.params.prompt_logprobs] * num)
        result[seq.request_id] = list(zip(chosen, top))
        start += num
    return result
