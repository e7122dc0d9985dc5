"""Scoring a model on held-out data: validation loss and token accuracy, and reference-text perplexity.

Every number is token-weighted over the positions that carry a label, the same quantity the training
loss averages, so a validation loss, a base-model loss and a training loss can be compared directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch

from loraplex.training.datasets import IGNORE_INDEX, ParsedDataset, TokenizedDataset

EVAL_BATCH_SIZE = 8
REFERENCE_WINDOW = 256  # tokens per perplexity window of the reference text


@dataclass(frozen=True)
class Score:
    loss: float  # mean cross-entropy per label token (nats)
    token_accuracy: float  # share of label tokens the argmax predicts
    num_tokens: int
    example_losses: tuple[float, ...] = ()  # summed over each example's label tokens, in data order
    example_tokens: tuple[int, ...] = ()  # label tokens per example: loss = sum(losses) / sum(tokens)
    reward_margin: float | None = None  # DPO: mean reward margin (token_accuracy is then preference accuracy)


def split_held_out(dataset: ParsedDataset, num_held_out: int, seed: int) -> tuple[ParsedDataset, ParsedDataset]:
    """(train, validation): `num_held_out` examples drawn with `seed`, the rest in their original order."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:num_held_out])
    train = tuple(ex for i, ex in enumerate(dataset.examples) if i not in held)
    valid = tuple(ex for i, ex in enumerate(dataset.examples) if i in held)
    return (ParsedDataset(dataset.format, train, dataset.num_bytes),
            ParsedDataset(dataset.format, valid, dataset.num_bytes))


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad with `pad_id`; pads get attention 0 and label IGNORE_INDEX so they change neither loss nor context."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for row, (ids, example_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(example_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def score(model, data: TokenizedDataset, pad_id: int, device: torch.device, check=lambda: None) -> Score:
    """Loss and next-token accuracy over the label tokens of `data` (the model is left in eval mode).
    `check()` runs before every batch; it raises to abandon the evaluation (a cancelled job)."""
    model.eval()
    num_correct, example_losses, example_tokens = 0, [], []
    for start in range(0, len(data.examples), EVAL_BATCH_SIZE):
        check()
        batch = collate(list(data.examples[start : start + EVAL_BATCH_SIZE]), pad_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, N+T, V], N virtual tokens
        logits = logits[:, -batch["input_ids"].shape[1]:]  # [B, T, V]: prompt tuning's N virtual tokens cut off
        logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t+1
        mask = targets != IGNORE_INDEX  # [B, T-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
        example_losses += (losses * mask).sum(dim=1).tolist()  # [B]
        example_tokens += mask.sum(dim=1).tolist()  # [B]
        num_correct += int((logits.argmax(-1) == targets)[mask].sum())
    num_labels = sum(example_tokens)
    return Score(sum(example_losses) / max(1, num_labels), num_correct / max(1, num_labels), num_labels,
                 tuple(example_losses), tuple(example_tokens))


def reference_text() -> str:
    """A few paragraphs of general prose shipped with the package: what "the base model's behaviour"
    is measured on when a job reports forgetting."""
    return resources.files("loraplex.training").joinpath("reference.txt").read_text(encoding="utf-8")


def reference_windows(tokenizer, text: str, max_len: int) -> TokenizedDataset:
    """The text cut into windows of at most REFERENCE_WINDOW tokens, every token a label."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = max(2, min(REFERENCE_WINDOW, max_len))
    windows = tuple((ids[i : i + width], ids[i : i + width]) for i in range(0, len(ids), width) if len(ids[i : i + width]) > 1)
    return TokenizedDataset(windows, 0, 0)


def perplexity(model, windows: TokenizedDataset, pad_id: int, device: torch.device, check=lambda: None) -> float:
    return math.exp(min(score(model, windows, pad_id, device, check).loss, 50.0))
