"""PEFT DoRA adapters that are never a no-op: random A and B (init_lora_weights=False), then each
magnitude vector perturbed (PEFT initialises it to ||W + sBA||, which makes DoRA equal plain LoRA)."""
from __future__ import annotations

from pathlib import Path


def make_dora_adapter(model_dir: Path, out_dir: Path, r: int = 8, alpha: int = 16, target_modules=("q_proj", "v_proj"),
                      seed: int = 0, spread: float = 0.6, **lora_fields) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # DoRA's magnitudes read W
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), use_dora=True,
                        init_lora_weights=False, task_type="CAUSAL_LM", **lora_fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:  # m * U(1 - spread/2, 1 + spread/2), per output feature
                    param.mul_(1 + spread * (torch.rand_like(param) - 0.5))
    model.save_pretrained(out_dir)
    return out_dir
