"""A tiny Llama built offline and deterministically: the default model for `make run`, tests and benchmarks.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on `demo_corpus.txt` (shipped in the
package); the weights come from a seeded random init. The same seed and overrides give the same bytes
on disk, so tests can compare against it and benchmarks can rebuild it anywhere.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from loraplex.fsutil import staging_dir
log = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
END_OF_TURN_TOKEN = "<|end_of_turn|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS, END_OF_TURN_TOKEN)  # ids 0..6

TOKENIZER_VOCAB_SIZE = 1024
VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this

# `<|role|>\ncontent<|end_of_turn|>\n` per message; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '" + END_OF_TURN_TOKEN + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    # Wider than Llama's 0.02 so random weights give varied, non-degenerate greedy outputs.
    "initializer_range": 0.05,
}

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
SPEC_FILE = "loraplex_demo.json"  # what was built; a mismatch means rebuild
SPEC_VERSION = 1


def ensure_demo_model(data_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Return `<data_dir>/.models/demo/` (or `out_dir=`), building it first unless already complete.

    `overrides` replace `LlamaConfig` fields (e.g. `hidden_size=576, num_hidden_layers=30, vocab_size=49152`).
    The directory appears whole or not at all: it is built in a temp dir and renamed into place.
    """
    out_dir = Path(overrides.pop("out_dir", None) or Path(data_dir) / ".models" / "demo")
    spec = {"version": SPEC_VERSION, "seed": seed, "config": {**DEFAULT_CONFIG, **overrides}}
    if _is_complete(out_dir, spec):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if _is_complete(out_dir, spec):  # another process built it while we waited
            return out_dir
        if out_dir.exists() and not (out_dir / SPEC_FILE).exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} was not built by ensure_demo_model; refusing to replace it")
        _remove_leftovers(out_dir)
        log.info("building demo model at %s (seed=%d)", out_dir, seed)
        with staging_dir(out_dir) as tmp:
            _build_model_dir(tmp, seed, spec["config"])
            _write_json(tmp / SPEC_FILE, spec)
            _swap_into_place(tmp, out_dir)
    return out_dir


def make_demo_adapter(
    model_dir: Path,
    out_dir: Path,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    layers_to_transform: list[int] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for `model_dir` to `out_dir` with random A and B (never a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    base.to_empty(device="cpu")  # LoRA needs the layer shapes only; base weights are never read
    base.name_or_path = str(model_dir)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,  # nn.Linear's default init for A and B, so B != 0
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=layers_to_transform,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, lora_config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card template: noise in an adapter store
        _swap_into_place(tmp, out_dir)
    return out_dir


def ensure_example_adapter(data_dir: Path, seed: int = 0) -> Path:
    """Seed `<data_dir>/demo/example/` (tenant `demo`, adapter `example`) for the demo model, if missing."""
    adapter_dir = Path(data_dir) / "demo" / "example"
    if not (adapter_dir / "adapter_config.json").exists():
        make_demo_adapter(ensure_demo_model(data_dir, seed), adapter_dir, seed=seed + 1)
    return adapter_dir


def build_demo_tokenizer():
    """Train the byte-level BPE on the shipped corpus and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any unicode round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,  # decode(encode(s)) == s
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: Llama takes none
    )


def _build_model_dir(out_dir: Path, seed: int, config_fields: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_demo_tokenizer()
    num_tokens = len(tokenizer)
    vocab_size = config_fields.get("vocab_size") or math.ceil(num_tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab_size < num_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the demo tokenizer ({num_tokens} tokens)")
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**{**config_fields, "vocab_size": vocab_size, **special_ids})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    # A chat reply ends at end-of-turn, a completion at end-of-text: generation stops at either.
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    model.generation_config = GenerationConfig(**{**special_ids, "eos_token_id": [tokenizer.eos_token_id, end_of_turn_id]})
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100GB")  # one file
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # chat_template inside tokenizer_config.json


def _corpus_lines() -> list[str]:
    text = resources.files("loraplex.models").joinpath("demo_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _is_complete(out_dir: Path, spec: dict[str, Any]) -> bool:
    if not all((out_dir / name).is_file() for name in MODEL_FILES):
        return False
    try:
        return json.loads((out_dir / SPEC_FILE).read_text()) == json.loads(json.dumps(spec))
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing (stale) `out_dir` is moved aside first, then deleted."""
    _make_world_readable(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_world_readable(root: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; a server running as another user must read them."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _remove_leftovers(out_dir: Path) -> None:
    """Staging dirs left by a crashed build (only lock holders create them, and we hold the lock)."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main() -> None:
    """`python -m loraplex.models.demo`: build the demo model and its example adapter for the configured data dir."""
    from loraplex.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if settings.model != "demo":
        log.info("model is %r, not the demo: nothing to seed", settings.model)
        return
    adapter_dir = ensure_example_adapter(settings.data_dir, settings.seed)
    log.info("demo model and example adapter ready: %s", adapter_dir)


if __name__ == "__main__":
    main()
