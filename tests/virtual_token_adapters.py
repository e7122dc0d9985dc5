"""PEFT prompt-tuning and prefix-tuning adapters for the demo model, randomly initialised (never a no-op)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def make_virtual_adapter(model_dir: Path, out_dir: Path, peft_type: str, num_virtual_tokens: int,
                         prefix_projection: bool = False, seed: int = 0) -> Path:
    """peft_type: PROMPT_TUNING (random prompt embeddings) or PREFIX_TUNING (random prefix, or random
    embeddings + MLP when `prefix_projection`: PEFT saves the MLP's output)."""
    if out_dir.exists():
        return out_dir
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    base.to_empty(device="cpu")  # the virtual tokens' init never reads the base weights
    base.name_or_path = str(model_dir)
    if peft_type == "PROMPT_TUNING":
        peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    else:
        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                         prefix_projection=prefix_projection, encoder_hidden_size=48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, peft_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent))
    peft_model.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
