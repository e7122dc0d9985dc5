"""The benchmark workload: a random-weight Llama model, its adapters and the prompts.

Everything is built from a seed, on disk, once per shape: a second run with the same shape reuses
the directories (a `workload.json` stamp says what was built). The server and the in-process
baselines read the very same files, so every system serves the same weights and adapters.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from loadtest.tokenizer import build_tokenizer, first_regular_id

TENANT = "bench"


@dataclass(frozen=True)
class ModelShape:
    """LlamaConfig fields; the default is SmolLM-135M's shape (tied embeddings)."""

    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    vocab_size: int = 49152
    tie_word_embeddings: bool = True

    @property
    def tag(self) -> str:
        return f"h{self.hidden_size}-l{self.num_hidden_layers}-v{self.vocab_size}"


TINY_SHAPE = ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


@dataclass(frozen=True)
class Workload:
    """What every system is asked to do: the same prompts, adapters and lengths."""

    shape: ModelShape = ModelShape()
    num_requests: int = 32
    prompt_len: int = 128
    new_tokens: int = 64
    num_adapters: int = 16
    lora_rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def adapter_name(self, i: int) -> str:
        return f"a{i:02d}"

    def adapter_for_request(self, i: int) -> str:
        """Request i uses adapter i mod num_adapters: every adapter appears, evenly."""
        return self.adapter_name(i % self.num_adapters)

    def quick(self) -> Workload:
        return replace(self, shape=TINY_SHAPE, num_requests=4, prompt_len=16, new_tokens=8, num_adapters=4)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BuiltWorkload:
    workload: Workload
    model_dir: Path
    data_dir: Path  # adapter store: <data_dir>/<TENANT>/<name>/
    num_params: int

    def adapter_dir(self, name: str) -> Path:
        return self.data_dir / TENANT / name


def build(workload: Workload, root: Path) -> BuiltWorkload:
    """Build (or reuse) the model and adapters under `root`."""
    model_dir = root / "models" / f"llama-{workload.shape.tag}-s{workload.seed}"
    data_dir = root / "adapters" / f"{model_dir.name}-r{workload.lora_rank}"
    _ensure_model(model_dir, workload.shape, workload.seed)
    _ensure_adapters(model_dir, data_dir / TENANT, workload)
    num_params = json.loads((model_dir / "workload.json").read_text())["num_params"]
    return BuiltWorkload(workload, model_dir, data_dir, num_params)


def make_prompts(built: BuiltWorkload) -> list[list[int]]:
    """Random token ids from a fixed seed, all regular tokens the tokenizer knows."""
    low, high = json.loads((built.model_dir / "workload.json").read_text())["prompt_id_range"]
    rng = random.Random(built.workload.seed)
    return [[rng.randrange(low, high) for _ in range(built.workload.prompt_len)]
            for _ in range(built.workload.num_requests)]


def _ensure_model(model_dir: Path, shape: ModelShape, seed: int) -> None:
    stamp = {"kind": "model", **asdict(shape), "seed": seed}
    if _is_built(model_dir, stamp):
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, source = build_tokenizer()
    config = LlamaConfig(**asdict(shape), max_position_embeddings=2048, dtype="float32",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    num_params = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    prompt_id_range = [first_regular_id(tokenizer), min(len(tokenizer), shape.vocab_size)]
    _write_stamp(model_dir, {**stamp, "num_params": num_params, "tokenizer": source,
                             "prompt_id_range": prompt_id_range})


def _ensure_adapters(model_dir: Path, tenant_dir: Path, workload: Workload) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = None
    for i in range(workload.num_adapters):
        out_dir, seed = tenant_dir / workload.adapter_name(i), workload.seed * 1000 + i + 1
        stamp = {"kind": "adapter", "model": model_dir.name, "r": workload.lora_rank,
                 "alpha": workload.lora_alpha, "targets": list(workload.target_modules), "seed": seed}
        if _is_built(out_dir, stamp):
            continue
        if base is None:
            base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # init_lora_weights=False: B is random too, so no adapter is a no-op.
        config = LoraConfig(r=workload.lora_rank, lora_alpha=workload.lora_alpha,
                            target_modules=list(workload.target_modules), init_lora_weights=False)
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, config)
        peft_model.save_pretrained(out_dir, safe_serialization=True)
        base = peft_model.unload()  # the bare base again, for the next adapter
        _write_stamp(out_dir, stamp)


def _is_built(path: Path, stamp: dict) -> bool:
    stamp_path = path / "workload.json"
    if not stamp_path.exists():
        return False
    saved = json.loads(stamp_path.read_text())
    return all(saved.get(k) == v for k, v in stamp.items())


def _write_stamp(path: Path, stamp: dict) -> None:
    (path / "workload.json").write_text(json.dumps(stamp, indent=1) + "\n")
