"""A small 3-topic classification task (sports / cooking / weather), generated from word lists with a
seed: every sentence mixes a topic's nouns and verbs with neutral filler, so a model must read the
words to label it. Used by the default-hyperparameter test and the champion-vs-challenger test."""
from __future__ import annotations

import json
import random

TOPICS = {
    "sports": (["striker", "goalkeeper", "referee", "stadium", "league", "coach", "match", "tennis racket"],
               ["scored", "tackled", "won the cup", "missed the penalty", "trained hard", "lost the final"]),
    "cooking": (["chef", "oven", "recipe", "garlic", "soup", "frying pan", "dough", "kitchen"],
                ["baked", "stirred", "seasoned the dish", "burned the toast", "chopped onions", "tasted the sauce"]),
    "weather": (["storm", "forecast", "rain", "thunder", "cloud", "snowfall", "wind", "heatwave"],
                ["flooded the town", "blew hard", "cleared by noon", "brought hail", "froze the roads", "dried the fields"]),
}
FILLER = ["Yesterday", "This morning", "Last week", "Suddenly", "As expected", "Once again", "Near the river"]


def topic_rows(num_rows: int, seed: int, shuffle_labels: bool = False) -> list[dict[str, str]]:
    """`num_rows` prompt/completion rows, topics balanced; `shuffle_labels` permutes the labels across rows."""
    rng = random.Random(seed)
    names = list(TOPICS)
    rows = []
    for i in range(num_rows):
        topic = names[i % len(names)]
        nouns, verbs = TOPICS[topic]
        text = f"{rng.choice(FILLER)} the {rng.choice(nouns)} {rng.choice(verbs)}."
        rows.append({"prompt": f"Text: {text}\nTopic:", "completion": f" {topic}"})
    rng.shuffle(rows)
    if shuffle_labels:
        labels = [row["completion"] for row in rows]
        random.Random(seed + 1).shuffle(labels)
        rows = [{**row, "completion": label} for row, label in zip(rows, labels)]
    return rows


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
