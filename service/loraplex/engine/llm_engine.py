"""One engine step = schedule -> run -> postprocess. Single-threaded; see async_engine for the loop."""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass

from loraplex.engine.adapter_residency import AdapterResidency
from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.config import EngineConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.errors import InvalidRequestError, PromptTooLongError
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.kv_cache import KVCache, bytes_per_token, kv_budget_bytes, num_blocks_for
from loraplex.engine.lora_pool import LoraPool
from loraplex.engine.merge import MergeManager
from loraplex.engine.merge_control import MergeControl
from loraplex.engine.merge_policy import MergeMode
from loraplex.engine.model import LlamaForServing
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.sampler import Sampler, SamplerOutput
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.structured import GrammarCompiler
from loraplex.engine.types import FinishReason, LoraRequest, RequestOutput, SamplingParams
from loraplex.engine.virtual_adapters import VirtualAdapters

log = logging.getLogger(__name__)

StepResult = tuple[str, "RequestOutput | Exception"]


@dataclass(frozen=True)
class AdapterState:
    residency: str  # merged | device | loading | host | storage
    is_pinned: bool
    merge_mode: str  # merged | unmerged | auto


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LlamaForServing, tokenizer):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.device = config.torch_device
        mc = model.config
        num_kv = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        self.kv_cache = _build_kv_cache(config, mc.num_hidden_layers, num_kv, model.head_dim, self.device)
        self.blocks = BlockManager(self.kv_cache.num_blocks, config.kv_block_size, config.enable_prefix_caching)
        # slots: 0 = base (zeros), 1..max_loras = adapters, max_loras + 1 = merge compensation
        self.lora_pool = LoraPool(model, config.max_loras + 2, config.max_lora_rank, list(config.lora_target_modules))
        self.slots = AdapterSlots(config.max_loras)
        self.residency_control = AdapterResidency(self.lora_pool, self.slots, config.max_cpu_loras,
                                                  config.max_lora_rank, config.torch_dtype)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens,
                                   context_cost(model) if config.chunk_by_compute else None)
        self.merge = MergeManager(self.lora_pool, compensation_slot=config.max_loras + 1)
        self.merging = MergeControl(self.merge, self.slots, self.residency_control.pinned_keys, config.default_merge_mode)
        self.merging.enabled = getattr(model, "quantization", None) is None  # no exact merge into quantized weights
        model.pack_weights(config.packed_gemms)
        self.vocab_size = mc.vocab_size
        self.eos_token_ids = _eos_ids(tokenizer, model) | set(config.extra_eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size)
        sampler = Sampler(self.device, self.grammars, self.eos_token_ids)
        self.runner = ModelRunner(model, self.kv_cache, self.merge, self.device, sampler,
                                  config.compile_decode and getattr(model, "quantization", None) is None)
        self.virtual = VirtualAdapters(model, self.kv_cache, self.blocks, config.max_cpu_loras, config.torch_dtype, self.device)
        self._seeds = random.Random(config.seed)
        self._seqs: dict[str, Sequence] = {}

    # --- requests -------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise before queueing anything the engine could not run."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.config.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length {self.config.max_model_len}"
            )
        if any(not 0 <= token < self.vocab_size for token, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        if params.guide is not None:
            self.grammars.compile(params.guide)  # cached: the API compiled it off the event loop already

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    lora: LoraRequest | None, tenant: str = "") -> None:
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        resolved = self.virtual.resolve(request_id, lora, len(prompt_ids), self.config.max_model_len)
        if resolved is None:  # failed: the next step reports it
            return
        lora, virtual = resolved  # a prompt/prefix-tuning adapter rides on the sequence, not in a slot
        seq = Sequence(request_id, list(prompt_ids), params, lora,
                       IncrementalDetokenizer(self.tokenizer, params.stop, prompt_ids), seed, tenant, virtual=virtual)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return self._output(seq)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._seqs)

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[StepResult]:
        results = self._apply_completed_loads() + self.virtual.take_failures()
        self.merging.apply()
        batch = self.scheduler.schedule()
        for lora, slot in batch.adapter_loads:
            self.residency_control.start_load(lora, slot)
        if batch.is_empty:
            return results
        sampled, prompt_logprobs = self.runner.run(batch)
        for request_id, entries in prompt_logprobs.items():
            seq = self._seqs[request_id]
            seq.prompt_logprobs = (seq.prompt_logprobs or []) + entries
        self.scheduler.update_computed(batch)
        self.merging.policy.observe(_tokens_by_adapter(batch))
        return results + self._postprocess(batch, sampled)

    def _postprocess(self, batch: ScheduledBatch, sampled: SamplerOutput) -> list[StepResult]:
        now = time.monotonic()
        results = []
        for i, seq in enumerate(batch.sampled_seqs):
            token = sampled.tokens[i]
            seq.output_ids.append(token)
            seq.output_logprobs.append(sampled.logprobs[i])
            if seq.params.logprobs is not None:
                seq.output_top_logprobs.append(sampled.top_logprobs[i])
            seq.first_token_time = seq.first_token_time or now
            stop_string = seq.detokenizer.append(seq.output_ids)
            self._check_finished(seq, token, stop_string, sampled.is_guide_done[i])
            results.append((seq.request_id, self._output(seq)))
        return results

    def _check_finished(self, seq: Sequence, token: int, stop_string: str | None, is_guide_done: bool) -> None:
        params = seq.params
        if is_guide_done:  # the grammar is complete (or only EOS could follow)
            self.scheduler.finish(seq, FinishReason.STOP, token)
        elif stop_string is not None:
            self.scheduler.finish(seq, FinishReason.STOP, stop_string)
        elif token in params.stop_token_ids:
            self.scheduler.finish(seq, FinishReason.STOP, token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            self.scheduler.finish(seq, FinishReason.STOP, token)
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.scheduler.finish(seq, FinishReason.LENGTH)

    def _output(self, seq: Sequence) -> RequestOutput:
        start = seq.num_emitted_tokens
        seq.num_emitted_tokens = len(seq.output_ids)
        output = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.output_ids[start:],
            new_logprobs=seq.output_logprobs[start:],
            new_top_logprobs=seq.output_top_logprobs[start:],
            prompt_logprobs=seq.prompt_logprobs if start == 0 else None,
            new_text=seq.detokenizer.take_delta(seq.is_finished),
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        if seq.is_finished:
            output.metrics = _request_metrics(seq)
            self.runner.release(seq.request_id)
            del self._seqs[seq.request_id]
        return output

    # --- adapters (admin): residency and merge control do the work ---------------------------
    def ensure_resident(self, lora: LoraRequest) -> bool:
        return self.virtual.ensure_loaded(lora) or self.residency_control.ensure_resident(lora)

    def set_pinned(self, lora: LoraRequest, is_pinned: bool) -> bool:
        return self.virtual.set_pinned(lora, is_pinned) or self.residency_control.set_pinned(lora, is_pinned)

    def evict(self, key: str) -> bool:
        """Drop an idle, unmerged adapter from its device slot and the host tier."""
        return self.virtual.evict(key) or (key != self.merged_key and self.residency_control.evict(key))

    def evict_versions_of(self, adapter_id: str) -> None:
        """After a delete elsewhere: unmerge it, drop idle cached versions of `<tenant>/<name>` (busy ones
        finish first) and every prefix-cache block computed with any of its versions."""
        prefix = adapter_id + "@"
        self.merging.forget_versions(prefix)
        self.virtual.drop_versions(prefix)
        for key in self.residency_control.cached_keys():
            if key.startswith(prefix):
                self.evict(key)
        self.blocks.drop_identity(prefix)

    def set_merge_mode(self, lora: LoraRequest, mode: MergeMode) -> bool:
        """merged: merge now (one adapter at a time), unmerged: never, auto: when it dominates traffic."""
        if mode == "merged" and not self.merging.enabled:
            raise InvalidRequestError(
                "merged mode is not available on a quantized base: adding the adapter's delta to 4-bit or 8-bit weights "
                "would round it away; the adapter is served unmerged (auto never merges here)", param="mode")
        self.virtual.refuse_merge(lora, mode)
        if mode == "merged" and not self.residency_control.ensure_resident(lora):
            return False
        self.merging.set_mode(lora.key, mode)
        return True

    def merge_mode(self, key: str) -> str:
        return self.merging.mode_of(key)

    def adapter_state(self, key: str) -> AdapterState:
        residency = "merged" if key == self.merged_key else self.residency_control.residency(key)
        residency = "device" if key in self.virtual else residency
        is_pinned = key in self.residency_control.pinned_keys or self.virtual.is_pinned(key)
        return AdapterState(residency, is_pinned, self.merging.mode_of(key))

    def residency(self, key: str) -> str:
        """merged | device | loading | host | storage"""
        return self.adapter_state(key).residency

    @property
    def merged_key(self) -> str | None:
        return self.merging.merged_key

    @property
    def num_merge_switches(self) -> int:
        return self.merging.num_switches

    def _apply_completed_loads(self) -> list[StepResult]:
        results = []
        for key, error in self.residency_control.apply_completed_loads():
            for seq in self.scheduler.fail_waiting_for(key):
                del self._seqs[seq.request_id]
                results.append((seq.request_id, error))
        return results

    def stats(self) -> dict:
        running, blocks = self.scheduler.running, self.blocks
        return {
            "num_running": len(running),
            "num_waiting": self.scheduler.num_waiting,
            "max_num_running": self.scheduler.max_num_running,
            "kv_cache_usage": blocks.num_used / blocks.num_blocks,
            "num_kv_blocks": blocks.num_blocks,
            "num_kv_blocks_used": blocks.num_used,
            "num_kv_blocks_cached": blocks.num_cached,
            "kv_block_size": blocks.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": blocks.num_cache_queries,
            "prefix_cache_hits": blocks.num_cache_hits,
            "resident_adapters": self.slots.resident_keys(),
            "host_adapters": self.residency_control.host_cache.keys(),
            "pinned_adapters": sorted(self.residency_control.pinned_keys),
            "running_adapters": sorted({s.lora_key for s in running if s.lora_key}),
            "waiting_adapters": sorted({s.lora_key for s in list(self.scheduler.waiting) if s.lora_key}),
            "max_loras": self.config.max_loras,
            "max_num_seqs": self.config.max_num_seqs,
            "num_adapter_loads": self.residency_control.num_loads,
            "num_adapter_evictions": self.slots.num_evictions,
            "merged_adapter": self.merged_key,
            "num_merge_switches": self.num_merge_switches,
            "last_merge_switch_s": self.merge.last_switch_s,
            **self.virtual.stats(),
        }

    def shutdown(self) -> None:
        self.residency_control.shutdown()


def _tokens_by_adapter(batch: ScheduledBatch) -> Counter:
    """Tokens computed this step per adapter key (None = base): one per decode, the chunk per prefill."""
    usage: Counter = Counter()
    for seq in batch.decode_seqs:
        usage[seq.lora_key] += 1
    for chunk in batch.prefill_chunks:
        usage[chunk.seq.lora_key] += chunk.num_tokens
    return usage


def _build_kv_cache(config: EngineConfig, num_layers: int, num_kv: int, head_dim: int, device) -> KVCache:
    token_bytes = bytes_per_token(num_layers, num_kv, head_dim, config.torch_dtype)
    budget = kv_budget_bytes(config.kv_cache_bytes, config.kv_cache_memory_share, device)
    num_blocks = num_blocks_for(budget, token_bytes, config.kv_block_size,
                                config.max_num_seqs * config.max_model_len, config.max_model_len)
    return KVCache(num_layers, num_blocks, config.kv_block_size, num_kv, head_dim, config.torch_dtype, device)


def context_cost(model: LlamaForServing) -> float:
    """Context positions whose attention (q.k and p.v: 4 * heads * head_dim flops per layer and token)
    costs as much as one token through a layer's weights (2 flops per weight)."""
    weights = sum(m.weight.numel() for (layer, _), m in model.lora_linears().items() if layer == 0)
    return weights / (2 * model.config.num_attention_heads * model.head_dim)


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = getattr(model.config, "eos_token_id", None)
    for value in (generation_eos, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def _request_metrics(seq: Sequence) -> dict[str, float]:
    now = time.monotonic()
    metrics = {"e2e_s": now - seq.arrival_time, "num_cached_tokens": seq.num_cached_tokens,
               "num_preemptions": seq.num_preemptions}
    if seq.scheduled_time is not None:
        metrics["queue_s"] = seq.scheduled_time - seq.arrival_time
    if seq.first_token_time is not None:
        metrics["ttft_s"] = seq.first_token_time - seq.arrival_time
        if len(seq.output_ids) > 1:
            metrics["tpot_s"] = (now - seq.first_token_time) / (len(seq.output_ids) - 1)
    return metrics
