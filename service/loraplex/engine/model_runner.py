"""Owns every device tensor: turns a ScheduledBatch into inputs, runs the model, samples."""
from __future__ import annotations

import itertools

import torch

from loraplex.engine.attention import AttentionMetadata, PrefillChunk, PrefillGroup, build_decode_groups
from loraplex.engine.compiled_lora import build_decode_lora, step_targets
from loraplex.engine.compiled_step import CompiledDecode, bucket_for
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.lora_ops import LoraBatch, build_lora_batch
from loraplex.engine.merge import MergeManager
from loraplex.engine.model import ForwardBatch, LlamaForServing
from loraplex.engine.logits_processors import RowTokens
from loraplex.engine.sampler import Sampler, SamplerOutput, top_logprobs
from loraplex.engine.scheduler import ScheduledBatch, ScheduledChunk
from loraplex.engine.prefix_kv import write_missing_prefixes
from loraplex.engine.sequence import Sequence
from loraplex.engine.virtual_tokens import virtual_inputs


class ModelRunner:
    def __init__(self, model: LlamaForServing, kv_cache: KVCache, merge: MergeManager, device: torch.device,
                 sampler: Sampler, compile_decode: bool = False):
        self.model, self.kv_cache, self.merge, self.device = model, kv_cache, merge, device
        self.block_size = kv_cache.block_size
        self.sampler = sampler
        self.compiled = CompiledDecode(model, device) if compile_decode else None  # pure-decode steps only

    def run(self, batch: ScheduledBatch) -> tuple[SamplerOutput, dict[str, list]]:
        """The sampled token (+ logprobs) for each of batch.sampled_seqs, in that order, and the prompt
        logprobs computed this step (request id -> entries for this chunk's prompt positions)."""
        if self.compiled is not None and batch.decode_seqs and not batch.prefill_chunks and not self._uses_dora(batch):
            logits, wanting = self._decode_compiled(batch.decode_seqs), []  # [n, V]
        else:
            input_ids, forward_batch, wanting = self._prepare(batch)
            logits = self.model(input_ids, forward_batch, self.kv_cache)  # [num_sampled + prompt positions, V]
        seqs = batch.sampled_seqs
        rows = [RowTokens(s.params, s.prompt_ids, s.output_ids) for s in seqs]
        if not seqs:  # only partial prompt chunks ran
            return SamplerOutput([], [], [], []), prompt_logprobs(logits, wanting)
        output = self.sampler.sample(logits[: len(seqs)], [s.request_id for s in seqs], rows, [s.seed for s in seqs])
        return output, prompt_logprobs(logits[len(seqs):], wanting)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def _uses_dora(self, batch: ScheduledBatch) -> bool:
        """DoRA's per-slot output scale (engine/dora.py) runs on the eager path only."""
        dora = self.merge.pool.dora_slots
        return bool(dora) and (self.merge.compensation_slot in dora or any(s.slot in dora for s in batch.decode_seqs))

    def _decode_compiled(self, decode: list[Sequence]) -> torch.Tensor:
        """Pads the batch to its bucket (token 0 at position 0, adapter slot 0); logits [n, V] of the real rows."""
        rows = bucket_for(len(decode))
        pad = [0] * (rows - len(decode))
        slots = [self._slot(s, s.num_tokens - 1) for s in decode]
        merged, pool = self.merge.merged_slot, self.merge.pool
        own = [0 if s.slot == merged else s.slot for s in decode]
        compensation = None
        if merged is not None:
            compensation = [0 if s.slot == merged else self.merge.compensation_slot for s in decode]
        targets = step_targets(pool.linears, set(own) | set(compensation or ()))
        lora = build_decode_lora(own, compensation, rows, pool.num_slots, pool.max_rank, self.device, targets)
        input_ids = self._tensor([s.last_token for s in decode] + pad)  # [B]
        positions = self._tensor([s.num_tokens - 1 for s in decode] + pad)  # [B]
        meta = self._attention_metadata(decode, [], slots)  # the n real rows only
        return self.compiled(input_ids, positions, lora, meta, self.kv_cache)

    # --- inputs --------------------------------------------------------------------------------
    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardBatch, list]:
        decode, chunks = batch.decode_seqs, batch.prefill_chunks
        token_ids = [s.last_token for s in decode]
        positions = [s.num_tokens - 1 for s in decode]
        slots = [self._slot(s, s.num_tokens - 1) for s in decode]
        logits_indices, start, prompt_indices, wanting = list(range(len(decode))), len(decode), [], []
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            token_ids += chunk.seq.token_ids[chunk.start:end]
            positions += range(chunk.start, end)
            slots += [self._slot(chunk.seq, p) for p in range(chunk.start, end)]
            wanted = _prompt_logprob_positions(chunk)  # positions predicting a prompt token, not yet reported
            if wanted:
                prompt_indices += [start + p - chunk.start for p in wanted]
                wanting.append((chunk.seq, wanted))
            start += chunk.num_tokens
            if chunk.is_last:
                logits_indices.append(start - 1)
        write_missing_prefixes(chunks, self.kv_cache)  # prefix-tuning K/V no forward computes
        forward_batch = ForwardBatch(
            input_embeds=virtual_inputs(len(decode), chunks, token_ids),  # prompt tuning (before token_ids)
            positions=self._tensor(positions),
            attention=self._attention_metadata(decode, chunks, slots),
            lora=self._lora_batch(decode, chunks),
            logits_indices=self._tensor(logits_indices + prompt_indices),  # run() splits the prompt rows off
        )
        return self._tensor(token_ids), forward_batch, wanting

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _lora_batch(self, decode: list[Sequence], chunks: list[ScheduledChunk]) -> LoraBatch:
        """Each token's adapter slot; with an adapter merged, its tokens need none and all others
        get the compensation pass (-merged delta) as well."""
        merged = self.merge.merged_slot
        own = lambda s: 0 if s.slot == merged else s.slot  # noqa: E731
        compensation = None
        if merged is not None:
            extra = lambda s: 0 if s.slot == merged else self.merge.compensation_slot  # noqa: E731
            compensation = self._build_lora([extra(s) for s in decode], [(c.num_tokens, extra(c.seq)) for c in chunks])
        return self._build_lora([own(s) for s in decode], [(c.num_tokens, own(c.seq)) for c in chunks], compensation)

    def _build_lora(self, decode_slots, prefill_runs, compensation=None) -> LoraBatch:
        pool = self.merge.pool
        return build_lora_batch(decode_slots, prefill_runs, self.device, pool.num_slots, pool.max_rank, compensation)

    def _attention_metadata(self, decode: list[Sequence], chunks: list[ScheduledChunk], slots: list[int]) -> AttentionMetadata:
        groups = ()
        if decode:
            groups = build_decode_groups([s.num_tokens for s in decode], [s.block_table for s in decode],
                                         self.block_size, self._tensor)
        fresh = [c for c in chunks if c.start == 0]
        return AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode=len(decode),
            decode_groups=groups,
            prefill_groups=self._prefill_groups(len(decode), fresh),
            prefill_chunks=self._prefill_chunks(len(decode) + sum(c.num_tokens for c in fresh), chunks[len(fresh):]),
        )

    def _prefill_groups(self, token_start: int, fresh: list[ScheduledChunk]) -> tuple[PrefillGroup, ...]:
        groups = []
        for length, members in itertools.groupby(fresh, key=lambda c: c.num_tokens):
            count = len(list(members))
            groups.append(PrefillGroup(token_start, count, length))
            token_start += length * count
        return tuple(groups)

    def _prefill_chunks(self, token_start: int, chunks: list[ScheduledChunk]) -> tuple[PrefillChunk, ...]:
        out = []
        for chunk in chunks:
            context = chunk.start + chunk.num_tokens
            table = self._tensor(chunk.seq.block_table[: -(-context // self.block_size)])
            out.append(PrefillChunk(token_start, chunk.num_tokens, context, table))
            token_start += chunk.num_tokens
        return tuple(out)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _prompt_logprob_positions(chunk: ScheduledChunk) -> range:
    """Positions of this chunk whose logits predict a prompt token and were not reported before (a
    recomputed sequence reported them on its first pass)."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return range(0)
    offset = seq.num_virtual_tokens  # prompt token i is at position offset + i
    first = max(chunk.start, offset + len(seq.prompt_logprobs or ()))
    return range(first, min(chunk.start + chunk.num_tokens, offset + len(seq.prompt_ids) - 1))


def prompt_logprobs(logits: torch.Tensor, wanting: list[tuple[Sequence, range]]) -> dict[str, list]:
    """logits: [sum of the positions, V] in `wanting` order -> request id -> for each position p,
    (logprob of prompt token p + 1, the position's top alternatives)."""
    result, start = {}, 0
    for seq, positions in wanting:
        num = len(positions)
        logprobs = torch.log_softmax(logits[start : start + num], dim=-1)  # [num, V]
        targets = torch.tensor([seq.token_ids[p + 1] for p in positions], device=logits.device).unsqueeze(1)
        chosen = logprobs.gather(1, targets).squeeze(1).tolist()
        top = top_logprobs(logprobs, [seq.params.prompt_logprobs] * num)
        result[seq.request_id] = list(zip(chosen, top))
        start += num
    return result
