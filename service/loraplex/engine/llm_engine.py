"""One engine step = schedule -> run -> postprocess. Single-threaded; see async_engine for the loop."""
from __future__ import annotations

import logging
import queue
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from loraplex.engine.adapter_slots import AdapterSlots
from loraplex.engine.config import EngineConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.errors import AdapterError, InvalidRequestError, PromptTooLongError
from loraplex.engine.host_cache import HostLoraCache
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.kv_cache import KVCache, bytes_per_token, kv_budget_bytes, num_blocks_for
from loraplex.engine.lora_pool import LoraPool
from loraplex.engine.lora_weights import HostLora, read_adapter
from loraplex.engine.merge import MergeManager
from loraplex.engine.merge_policy import MergeMode, MergePolicy
from loraplex.engine.model import LlamaForServing
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.sampler import Sampler, SamplerOutput
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.structured import GrammarCompiler
from loraplex.engine.types import FinishReason, LoraRequest, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

StepResult = tuple[str, "RequestOutput | Exception"]


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
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens)
        self.merge = MergeManager(self.lora_pool, compensation_slot=config.max_loras + 1)
        self.merge_policy = MergePolicy(default_mode=config.default_merge_mode)
        self.merged_key: str | None = None
        self.num_merge_switches = 0
        self.vocab_size = mc.vocab_size
        self.eos_token_ids = _eos_ids(tokenizer, model) | set(config.extra_eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size)
        sampler = Sampler(self.device, self.grammars, self.eos_token_ids)
        self.runner = ModelRunner(model, self.kv_cache, self.merge, self.device, sampler)
        self.completed_loads: queue.SimpleQueue = queue.SimpleQueue()
        self.host_cache = HostLoraCache(config.max_cpu_loras)
        self.pinned_keys: set[str] = set()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")
        self._seeds = random.Random(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self.on_wake = lambda: None  # called from the loader thread when a load completes
        self.on_adapter_loaded = lambda key, seconds: None  # called on the engine thread
        self.num_adapter_loads = 0

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
        seq = Sequence(request_id, list(prompt_ids), params, lora,
                       IncrementalDetokenizer(self.tokenizer, params.stop, prompt_ids), seed, tenant)
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
        results = self._apply_completed_loads()
        self._apply_merge_policy()
        batch = self.scheduler.schedule()
        for lora, slot in batch.adapter_loads:
            self._start_load(lora, slot)
        if batch.is_empty:
            return results
        sampled, prompt_logprobs = self.runner.run(batch)
        for request_id, entries in prompt_logprobs.items():
            seq = self._seqs[request_id]
            seq.prompt_logprobs = (seq.prompt_logprobs or []) + entries
        self.scheduler.update_computed(batch)
        self.merge_policy.observe(_tokens_by_adapter(batch))
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

    # --- adapters --------------------------------------------------------------------------
    def _start_load(self, lora: LoraRequest, slot: int) -> None:
        started = time.monotonic()
        future = self._loader.submit(self._read_adapter, lora)
        future.add_done_callback(lambda f: (self.completed_loads.put((lora.key, slot, f, started)), self.on_wake()))

    def _read_adapter(self, lora: LoraRequest) -> HostLora:
        """Loader thread: the host tier if it has this version, else storage (then cached on the host)."""
        host = self.host_cache.get(lora.key)
        if host is None:
            host = read_adapter(lora.key, lora.path, self.config.max_lora_rank,
                                self.lora_pool.module_shapes, self.config.torch_dtype)
            self.host_cache.put(host)
        return host

    # --- residency control (admin) ---------------------------------------------------------------
    def ensure_resident(self, lora: LoraRequest) -> bool:
        """Start loading `lora` into a device slot if it is not there. False if no slot can be freed."""
        if self.slots.slot_of(lora.key) is not None:
            return True
        if not self.slots.can_load():
            return False
        slot, _ = self.slots.load(lora.key)
        self._start_load(lora, slot)
        return True

    def set_pinned(self, lora: LoraRequest, is_pinned: bool) -> bool:
        """Pinned adapters are loaded now and never evicted. False if no slot can be freed for it."""
        if not is_pinned:
            self.pinned_keys.discard(lora.key)
            if self.slots.slot_of(lora.key) is not None:
                self.slots.pin(lora.key, False)
            return True
        if not self.ensure_resident(lora):
            return False
        self.pinned_keys.add(lora.key)
        self.slots.pin(lora.key, True)
        return True

    def evict(self, key: str) -> bool:
        """Drop an idle adapter from its device slot and the host tier. False while requests use it."""
        state = self.slots.slot_of(key)
        if key == self.merged_key or (state is not None and (state.num_refs or not state.is_ready)):
            return False
        self.pinned_keys.discard(key)
        self.host_cache.discard(key)
        if state is not None:
            self.lora_pool.clear(self.slots.drop(key))
        return True

    def drop_cached_blocks(self, adapter_id: str) -> int:
        """After a delete: forget every prefix-cache block computed with any version of `<tenant>/<name>`."""
        return self.blocks.drop_identity(adapter_id + "@")

    def evict_versions_of(self, adapter_id: str) -> None:
        """After a delete elsewhere: drop idle cached versions of `<tenant>/<name>` (busy ones finish first)."""
        prefix = adapter_id + "@"
        merged = self.merged_key
        if merged is not None and merged.startswith(prefix):  # else it would stay merged (and pinned) for good
            self.merge_policy.modes[merged] = "unmerged"  # its running requests finish unmerged
            self._apply_merge_policy()
        for key in [k for k in self.merge_policy.modes if k.startswith(prefix)]:
            del self.merge_policy.modes[key]
        for key in set(self.slots.resident_keys()) | set(self.host_cache.keys()):
            if key.startswith(prefix):
                self.evict(key)
        self.drop_cached_blocks(adapter_id)

    # --- merged serving ------------------------------------------------------------------------
    def set_merge_mode(self, lora: LoraRequest, mode: MergeMode) -> bool:
        """merged: merge now (one adapter at a time), unmerged: never, auto: when it dominates traffic."""
        modes = self.merge_policy.modes
        if mode == "merged":
            for key in [k for k, m in modes.items() if m == "merged"]:
                modes[key] = "unmerged"
            if not self.ensure_resident(lora):
                return False
        modes[lora.key] = mode
        self._apply_merge_policy()
        return True

    def merge_mode(self, key: str) -> str:
        return self.merge_policy.mode_of(key)

    def _apply_merge_policy(self) -> None:
        desired = self.merge_policy.desired(self.merged_key)
        if desired == self.merged_key or (desired is not None and not self.slots.is_ready(desired)):
            return
        seconds = 0.0
        if self.merged_key is not None:
            self.merge.unmerge()
            seconds += self.merge.last_switch_s
            if self.slots.slot_of(self.merged_key) is not None:
                self.slots.pin(self.merged_key, self.merged_key in self.pinned_keys)
        if desired is not None:
            self.merge.merge(self.slots.slot_of(desired).index)
            seconds += self.merge.last_switch_s
            self.slots.pin(desired, True)  # a merged adapter's slot must not be reused
        log.info("merge switch", extra={"unmerged": self.merged_key, "merged": desired, "seconds": round(seconds, 4)})
        self.merged_key = desired
        self.num_merge_switches += 1
        self.merge_policy.switched()

    def residency(self, key: str) -> str:
        """device | loading | host | storage"""
        state = self.slots.slot_of(key)
        if key == self.merged_key:
            return "merged"
        if state is not None:
            return "device" if state.is_ready else "loading"
        return "host" if self.host_cache.get(key) is not None else "storage"

    def _apply_completed_loads(self) -> list[StepResult]:
        results = []
        while not self.completed_loads.empty():
            key, slot, future, started = self.completed_loads.get()
            error = future.exception()
            if error is None:
                self.lora_pool.write(slot, future.result())
                self.slots.mark_ready(key)
                self.num_adapter_loads += 1
                self.on_adapter_loaded(key, time.monotonic() - started)
                continue
            log.warning("adapter %s failed to load: %s", key, error)
            self.slots.drop(key)
            if not isinstance(error, AdapterError):
                error = AdapterError(f"adapter could not be loaded: {error}")
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
            "host_adapters": self.host_cache.keys(),
            "pinned_adapters": sorted(self.pinned_keys),
            "running_adapters": sorted({s.lora_key for s in running if s.lora_key}),
            "waiting_adapters": sorted({s.lora_key for s in list(self.scheduler.waiting) if s.lora_key}),
            "max_loras": self.config.max_loras,
            "max_num_seqs": self.config.max_num_seqs,
            "num_adapter_loads": self.num_adapter_loads,
            "num_adapter_evictions": self.slots.num_evictions,
            "merged_adapter": self.merged_key,
            "num_merge_switches": self.num_merge_switches,
            "last_merge_switch_s": self.merge.last_switch_s,
        }

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


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
    metrics = {"e2e_s": now - seq.arrival_time}
    if seq.scheduled_time is not None:
        metrics["queue_s"] = seq.scheduled_time - seq.arrival_time
    if seq.first_token_time is not None:
        metrics["ttft_s"] = seq.first_token_time - seq.arrival_time
        if len(seq.output_ids) > 1:
            metrics["tpot_s"] = (now - seq.first_token_time) / (len(seq.output_ids) - 1)
    return metrics
