"""Generate keywords_train.jsonl / keywords_valid.jsonl: sentiment of a review decided by one keyword.

Deterministic (fixed seed, no dependencies): `python adapters/examples/make_keywords.py` rewrites both
files byte for byte. The held-out file shares the keywords but none of the sentence templates or
nouns, so a model that scores well on it has learned the keywords, not the training sentences.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
NUM_TRAIN = 200
NUM_VALID = 60

# Words the demo tokenizer splits into few pieces, so a 4-layer random-weight model can learn them quickly.
KEYWORDS = {
    "positive": ["good", "fresh", "wonderful", "best", "bright", "kind", "great", "amazing"],
    "negative": ["bad", "awful", "slow", "dry", "cold", "worst", "boring", "weak"],
}
# The keyword sits early, in the middle and last, so position is no shortcut; held-out templates differ.
TRAIN_TEMPLATES = [
    "The {noun} was {kw}.",
    "What a {kw} {noun}!",
    "I found the {noun} {kw}, to be honest.",
    "It was a {kw} {noun} for the whole family.",
    "Everyone said the {noun} was {kw} this time.",
    "My friends and I thought it was a {kw} {noun}.",
    "The {noun} felt {kw} from the first minute.",
    "Our {noun} is {kw}.",
    "They told us the {noun} would be {kw}, and it was.",
    "So {kw}, that {noun}.",
    "After the rain, the {noun} still looked {kw}.",
    "Such a {kw} {noun} in our town.",
]
VALID_TEMPLATES = [
    "Honestly, the {noun} seemed {kw} to me.",
    "We agreed that this {noun} is {kw}.",
    "A {kw} {noun}, from start to finish.",
    "Last week the {noun} looked {kw} again.",
]
TRAIN_NOUNS = [
    "movie", "book", "dinner", "hotel", "concert", "bakery", "trip", "game", "show", "cafe",
    "bread", "room", "park", "song", "team", "server", "program", "river", "street", "school",
    "dog", "computer", "music", "car", "bridge", "garden", "city", "coffee", "soup", "class",
]
VALID_NOUNS = ["lake", "town", "bar", "museum", "album", "sky", "trees", "shelves"]


def make_examples(templates: list[str], nouns: list[str], count: int, rng: random.Random) -> list[dict[str, str]]:
    """`count` distinct examples, the two labels alternating so each file is balanced."""
    examples, seen = [], set()
    while len(examples) < count:
        label = "positive" if len(examples) % 2 == 0 else "negative"
        sentence = rng.choice(templates).format(noun=rng.choice(nouns), kw=rng.choice(KEYWORDS[label]))
        if sentence in seen:
            continue
        seen.add(sentence)
        examples.append({"prompt": f"Review: {sentence}\nSentiment:", "completion": f" {label}"})
    return examples


def write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples), encoding="utf-8")


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = random.Random(SEED)
    train = make_examples(TRAIN_TEMPLATES, TRAIN_NOUNS, NUM_TRAIN, rng)
    valid = make_examples(VALID_TEMPLATES, VALID_NOUNS, NUM_VALID, rng)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in valid}, "held-out sentences leaked into train"
    write_jsonl(here / "keywords_train.jsonl", train)
    write_jsonl(here / "keywords_valid.jsonl", valid)


if __name__ == "__main__":
    main()
