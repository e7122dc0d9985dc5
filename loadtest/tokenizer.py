"""The benchmark model's tokenizer: loraplex's demo tokenizer when importable, else a small local one.

The benchmark sends token-id prompts, so the tokenizer only has to exist (the server loads one and
detokenizes completions). The model vocabulary may be larger than the tokenizer's: ids past the
tokenizer decode to nothing, which is fine for a throughput benchmark.
"""
from __future__ import annotations

_FALLBACK_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

_FALLBACK_CORPUS = """\
The quick brown fox jumps over the lazy dog. A multi-LoRA server batches requests for many
adapters over one base model. Each request names its adapter; the engine gathers the low-rank
weights per token and adds them to the base projection. SELECT name, count(*) FROM orders GROUP BY
name ORDER BY 2 DESC; def main(): print("hello, world") 0123456789 {"key": [1, 2, 3]}
"""


def build_tokenizer():
    """(PreTrainedTokenizerFast, source) where source is "loraplex-demo" or "loadtest"."""
    try:
        from loraplex.models.demo import build_demo_tokenizer
    except ImportError:
        return _build_fallback(), "loadtest"
    return build_demo_tokenizer(), "loraplex-demo"


def first_regular_id(tokenizer) -> int:
    """Prompts draw ids above every special token, so no prompt holds a BOS/EOS/role marker."""
    return max(tokenizer.all_special_ids) + 1


def _build_fallback():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=_FALLBACK_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_FALLBACK_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=2048)
