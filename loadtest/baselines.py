"""The HF transformers + PEFT baselines, run in-process on the same files and prompts.

- mixed: one PeftModel holding every adapter, one batched `generate(adapter_names=[...])` for all
  requests (PEFT's mixed-adapter batch).
- naive: what a one-request-at-a-time server does: per request `set_adapter(name)` then a batch-1
  `generate`. All requests arrive at t=0, so request i waits for the i-1 before it.
Both include prefill and force exactly `new_tokens` tokens (min_new_tokens), like ignore_eos.
Model loading happens outside the timed region; each system is warmed up once before timing.
"""
from __future__ import annotations

import time

import torch

from loadtest.metrics import RunResult
from loadtest.runtime import Runtime
from loadtest.workload import BuiltWorkload


def load_peft_model(built: BuiltWorkload, rt: Runtime):
    """The base model with every benchmark adapter loaded, as a PEFT user would do it."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    wl = built.workload
    base = LlamaForCausalLM.from_pretrained(built.model_dir, dtype=rt.dtype).to(rt.device).eval()
    names = [wl.adapter_name(i) for i in range(wl.num_adapters)]
    model = PeftModel.from_pretrained(base, built.adapter_dir(names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(built.adapter_dir(name), adapter_name=name)
    return model.eval()


@torch.inference_mode()
def _generate(model, rt: Runtime, prompts: list[list[int]], new_tokens: int, **kwargs) -> torch.Tensor:
    input_ids = torch.tensor(prompts, dtype=torch.long, device=rt.device)  # [B, prompt_len], no padding
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **kwargs)
    assert out.shape == (len(prompts), input_ids.shape[1] + new_tokens), out.shape
    return out


def run_mixed(model, built: BuiltWorkload, rt: Runtime, prompts: list[list[int]]) -> RunResult:
    wl = built.workload
    adapters = [wl.adapter_for_request(i) for i in range(len(prompts))]
    warm = min(4, len(prompts))
    _generate(model, rt, prompts[:warm], 2, adapter_names=adapters[:warm])
    wall_s = rt.timed(lambda: _generate(model, rt, prompts, wl.new_tokens, adapter_names=adapters))
    return RunResult(
        system="hf_peft_mixed", wall_s=wall_s, num_requests=len(prompts),
        num_output_tokens=len(prompts) * wl.new_tokens, latencies_s=[wall_s] * len(prompts),
        notes="in-process PeftModel.generate(adapter_names=...), one batch of all requests",
    )


def run_naive(model, built: BuiltWorkload, rt: Runtime, prompts: list[list[int]],
              max_wall_s: float | None = None) -> RunResult:
    """Sequential requests; stops early once `max_wall_s` is spent (throughput from those served)."""
    wl = built.workload
    model.set_adapter(wl.adapter_for_request(0))
    _generate(model, rt, prompts[:1], 2)
    latencies: list[float] = []
    rt.sync()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        model.set_adapter(wl.adapter_for_request(i))
        _generate(model, rt, [prompt], wl.new_tokens)
        rt.sync()
        latencies.append(time.perf_counter() - start)
        if max_wall_s is not None and latencies[-1] > max_wall_s:
            break
    served = len(latencies)
    notes = "in-process, per request set_adapter + batch-1 generate, sequential"
    if served < len(prompts):
        notes += f"; time budget {max_wall_s:.0f}s reached: measured {served} of {len(prompts)} requests"
    return RunResult(system="hf_peft_naive", wall_s=latencies[-1], num_requests=served,
                     num_output_tokens=served * wl.new_tokens, latencies_s=latencies, notes=notes)


def run_all(built: BuiltWorkload, rt: Runtime, prompts: list[list[int]], skip_naive: bool = False,
            naive_max_wall_s: float | None = None, log=print) -> dict[str, RunResult]:
    model = load_peft_model(built, rt)
    results = {"hf_peft_mixed": run_mixed(model, built, rt, prompts)}
    log(f"hf_peft_mixed: {results['hf_peft_mixed'].tokens_per_s:.1f} tok/s")
    if not skip_naive:
        results["hf_peft_naive"] = run_naive(model, built, rt, prompts, naive_max_wall_s)
        log(f"hf_peft_naive: {results['hf_peft_naive'].tokens_per_s:.1f} tok/s")
    del model
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return results
