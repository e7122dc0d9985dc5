"""The frozen base of a training job, loaded as the server loads it: full precision, or quantized with
bitsandbytes (QLoRA: nf4 base, LoRA factors in full precision); and the job's peak memory.

The adapter a QLoRA job writes is an ordinary PEFT adapter: served on the full-precision base (the usual
QLoRA practice) or on a quantized one.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch


def load_base(model_dir: Path, quantization: str, gradient_checkpointing: bool, device: torch.device):
    """An HF causal LM ready for peft: quantization none | int8 | nf4; activations recomputed in backward
    when `gradient_checkpointing`."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantization == "none":
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        from peft import prepare_model_for_kbit_training

        from loraplex.engine.quantization import bnb, fp32_cpu_compute, transformers_config

        bnb()  # the extra is missing: a clear error
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device},
                                                    quantization_config=transformers_config(quantization, dtype))
        fp32_cpu_compute(base)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.config.use_cache = False  # no KV cache while training
    return base


class PeakMemory:
    """Peak memory of this process from now on: CUDA peak allocated on GPU; RSS high-water mark on CPU
    (Linux: reset through /proc/self/clear_refs, so it is this job's, not the process's lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux, or not allowed: the lifetime peak then

    @property
    def kind(self) -> str:
        return "cuda_peak_allocated" if self.device.type == "cuda" else "rss_peak"

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None


def on_served_base(model, model_dir: Path, quantization: str, device: torch.device, objective, best, check):
    """A QLoRA job on a full-precision server: its adapter is served on the full-precision base, so it is
    scored there. Returns the adapter on that base (eval mode) and `best` re-scored on it (None stays None)."""
    import dataclasses
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        served = PeftModel.from_pretrained(load_base(model_dir, quantization, False, device), tmp).eval()
    if best is None:
        return served, None
    score = objective.evaluate(served, check)
    return served, dataclasses.replace(best, valid_loss=score.loss, valid_token_accuracy=score.token_accuracy, score=score)
