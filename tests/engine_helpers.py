"""Drive LLMEngine synchronously, and compute HF/PEFT greedy references."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_loader import load_model
from loraplex.engine.types import LoraRequest, SamplingParams


def build_llm_engine(model_dir: Path, device: str = "cpu", dtype: str = "float32", **limits) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), device=device, dtype=dtype, **limits)
    model = load_model(str(model_dir), config.torch_dtype, config.torch_device, config.max_model_len,
                       quantization=config.quantization)
    return LLMEngine(config, model, AutoTokenizer.from_pretrained(model_dir))


def lora(adapter_dir: Path | None) -> LoraRequest | None:
    return LoraRequest(key=f"{adapter_dir.parent.name}/{adapter_dir.name}", path=str(adapter_dir)) if adapter_dir else None


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def step_until_idle(engine: LLMEngine, timeout_s: float = 120.0):
    """Step until no request is unfinished; yields (request_id, output) pairs. Adapters load on another
    thread, so a step may have nothing to run: then wait a moment instead of spinning."""
    deadline = time.monotonic() + timeout_s
    while engine.unfinished_request_ids():
        assert time.monotonic() < deadline, "engine did not finish"
        results = engine.step()
        yield from results
        if not results and not engine.scheduler.num_running:
            time.sleep(0.001)


def run_to_completion(engine: LLMEngine, requests: dict[str, tuple]) -> dict[str, list[int]]:
    """requests: id -> (prompt_ids, params, lora). Returns id -> generated token ids."""
    for request_id, (prompt_ids, params, adapter) in requests.items():
        engine.add_request(request_id, prompt_ids, params, adapter)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    for request_id, output in step_until_idle(engine):
        assert not isinstance(output, Exception), output
        tokens[request_id] += output.new_token_ids
    return tokens


def peft_reference(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from HF generate (+ PEFT when an adapter is given), one prompt at a time, fp32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    # The equivalent of ignore_eos: no EOS at all (min_new_tokens would instead *suppress* EOS ids).
    # generate() refills fields of a passed config from the model's, so edit the model's own.
    config = model.generation_config
    config.eos_token_id = None
    config.pad_token_id = model.config.pad_token_id or 0
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=max_tokens, do_sample=False
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs
