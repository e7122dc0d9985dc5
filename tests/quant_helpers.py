"""References for the quantized base: transformers + bitsandbytes (+ peft) with the same quantized weights."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def bnb_config(method: str, dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_quantized_hf(model_dir: Path, method: str | None) -> torch.nn.Module:
    """fp32 compute. bitsandbytes' CPU fast path for 4-bit layers (AVX512-BF16 machines) computes in bf16
    and needs d_out % 32 == 0: it is turned off, so the reference is dequantize + fp32 GEMM, as served."""
    config = bnb_config(method) if method and method != "none" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def quantized_reference(model_dir: Path, method: str | None, adapter_dir: Path | None, prompts: list[list[int]],
                        max_tokens: int) -> list[list[int]]:
    """Greedy tokens from HF generate on the quantized base (+ PEFT when an adapter is given), one prompt at a time."""
    model = load_quantized_hf(model_dir, method)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    config = model.generation_config
    config.eos_token_id = None  # the equivalent of ignore_eos
    config.pad_token_id = model.config.pad_token_id or 0
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             max_new_tokens=max_tokens, do_sample=False)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs
