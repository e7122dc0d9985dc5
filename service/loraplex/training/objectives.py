"""What a run optimizes and how it is scored. `SupervisedObjective` here (next-token loss on the labelled
tokens); `dpo.DpoObjective` for preference pairs. The trainer's loop only calls:

- `prepare(model, check)` once before the first step (DPO: the reference log-probabilities);
- `epoch_batches(epoch)`: one epoch's batches, the training examples plus that epoch's replayed ones
  (`replay_fraction` x the training examples, drawn afresh every epoch), shuffled with the run's seed;
- `loss(model, batch)`: the batch's training loss (a tensor to backpropagate) and its token count;
- `evaluate(model, check)`: a `Score` on the validation data, with per-example losses for the bootstrap.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from loraplex.training.datasets import TokenizedDataset
from loraplex.training.evaluation import Score, collate, score


def epoch_order(num_train: int, num_replay: int, num_replayed: int, seed: int) -> list[tuple[bool, int]]:
    """(is_replay, index) for one epoch: every training example, `num_replayed` replay examples drawn
    without replacement (all of them if fewer), the whole shuffled. Same seed, same order."""
    generator = torch.Generator().manual_seed(seed)
    replayed = torch.randperm(num_replay, generator=generator).tolist()[:num_replayed] if num_replay else []
    items = [(False, i) for i in range(num_train)] + [(True, i) for i in replayed]
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


class SupervisedObjective:
    method = "supervised"

    def __init__(self, train: TokenizedDataset, valid: TokenizedDataset | None, replay: TokenizedDataset | None,
                 hp, pad_id: int, device: torch.device):
        self.train, self.valid, self.replay = train, valid, replay
        self.hp, self.pad_id, self.device = hp, pad_id, device
        self.num_replayed = round(hp.replay_fraction * len(train.examples)) if replay is not None else 0

    @property
    def num_examples(self) -> int:
        return len(self.train.examples)

    def prepare(self, model, check) -> None:
        """Nothing to precompute for next-token loss."""

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        replay = self.replay.examples if self.replay is not None else ()
        order = epoch_order(self.num_examples, len(replay), self.num_replayed, self.hp.seed + epoch)
        examples = [replay[i] if is_replay else self.train.examples[i] for is_replay, i in order]
        for start in range(0, len(examples), self.hp.batch_size):
            yield collate(examples[start : start + self.hp.batch_size], self.pad_id)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        return model(**batch).loss, int(batch["attention_mask"].sum())  # mean over the batch's label tokens

    def evaluate(self, model, check) -> Score:
        return score(model, self.valid, self.pad_id, self.device, check)
