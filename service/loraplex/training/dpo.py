"""Direct preference optimization on a LoRA: the sigmoid DPO loss, with the frozen base model (the adapter
disabled) as the reference policy.

For a pair (prompt x, preferred y+, rejected y-), with log-probabilities summed over the answer tokens,

    margin = beta * ((log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x)))
    loss   = -log sigmoid(margin)

`margin` is the reward margin: > 0 means the adapter prefers the preferred answer more than the base
does. Preference accuracy is the share of pairs with margin > 0. The reference log-probabilities are
computed once, before the first step, for every pair the run will see.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from loraplex.training.datasets import IGNORE_INDEX, ParsedDataset
from loraplex.training.evaluation import EVAL_BATCH_SIZE, Score, collate
from loraplex.training.objectives import epoch_order
from loraplex.training.preference import tokenize_pair

Pair = tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]  # (ids, labels) preferred, rejected


def tokenize_pairs(tokenizer, dataset: ParsedDataset, max_len: int) -> tuple[Pair, ...]:
    return tuple(tokenize_pair(tokenizer, example, max_len) for example in dataset.examples)


def sequence_logps(model, pairs: list[Pair], pad_id: int, device: torch.device) -> torch.Tensor:
    """[2P]: log p(answer | prompt) of every preferred answer, then every rejected one."""
    batch = collate([pair[0] for pair in pairs] + [pair[1] for pair in pairs], pad_id)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2P, N+T, V], N virtual tokens
    logits = logits[:, -batch["input_ids"].shape[1]:]  # [2P, T, V]: prompt tuning's N virtual tokens cut off
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t+1
    mask = targets != IGNORE_INDEX  # [2P, T-1]
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [2P, T-1]
    return (token_logps * mask).sum(dim=1)  # [2P]


def dpo_margins(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """policy, reference: [2P] as `sequence_logps` returns them -> reward margins [P]."""
    num_pairs = policy.shape[0] // 2
    log_ratios = policy - reference  # [2P]
    return beta * (log_ratios[:num_pairs] - log_ratios[num_pairs:])


class DpoObjective:
    method = "dpo"

    def __init__(self, train: tuple[Pair, ...], valid: tuple[Pair, ...] | None, replay: tuple[Pair, ...] | None,
                 hp, pad_id: int, device: torch.device):
        self.train, self.valid, self.replay = train, valid, replay or ()
        self.hp, self.pad_id, self.device = hp, pad_id, device
        self.num_replayed = round(hp.replay_fraction * len(train)) if replay else 0
        self.reference: dict[str, torch.Tensor] = {}  # source -> [2P] reference log-probabilities

    @property
    def num_examples(self) -> int:
        return len(self.train)

    @torch.no_grad()
    def prepare(self, model, check) -> None:
        model.eval()
        with model.disable_adapter():
            for source, pairs in (("train", self.train), ("replay", self.replay), ("valid", self.valid or ())):
                self.reference[source] = self._logps_in_batches(model, pairs, check)

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        order = epoch_order(len(self.train), len(self.replay), self.num_replayed, self.hp.seed + epoch)
        for start in range(0, len(order), self.hp.batch_size):
            chunk = order[start : start + self.hp.batch_size]
            pairs = [(self.replay if is_replay else self.train)[i] for is_replay, i in chunk]
            reference = [self._reference_of("replay" if is_replay else "train", i) for is_replay, i in chunk]
            yield {"pairs": pairs, "reference": torch.stack(reference).T.reshape(-1)}  # [2P]: preferred..., rejected...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        policy = sequence_logps(model, batch["pairs"], self.pad_id, self.device)
        margins = dpo_margins(policy, batch["reference"].to(self.device), self.hp.beta)
        num_tokens = sum(len(pair[0][0]) + len(pair[1][0]) for pair in batch["pairs"])
        return -F.logsigmoid(margins).mean(), num_tokens

    @torch.no_grad()
    def evaluate(self, model, check) -> Score:
        model.eval()
        policy = self._logps_in_batches(model, self.valid, check)
        margins = dpo_margins(policy, self.reference["valid"], self.hp.beta)  # [P]
        losses = -F.logsigmoid(margins)  # [P]
        return Score(float(losses.mean()), float((margins > 0).float().mean()), len(self.valid),
                     tuple(losses.tolist()), (1,) * len(self.valid), reward_margin=float(margins.mean()))

    def _reference_of(self, source: str, index: int) -> torch.Tensor:
        """[2]: the pair's reference log-probabilities (preferred, rejected)."""
        logps = self.reference[source]
        num_pairs = logps.shape[0] // 2
        return torch.stack([logps[index], logps[num_pairs + index]])

    def _logps_in_batches(self, model, pairs, check) -> torch.Tensor:
        """[2P] for `pairs`, computed EVAL_BATCH_SIZE pairs at a time: preferred first, then rejected."""
        preferred, rejected = [], []
        for start in range(0, len(pairs), EVAL_BATCH_SIZE):
            check()
            logps = sequence_logps(model, list(pairs[start : start + EVAL_BATCH_SIZE]), self.pad_id, self.device)
            half = logps.shape[0] // 2
            preferred.append(logps[:half].cpu())
            rejected.append(logps[half:].cpu())
        return torch.cat(preferred + rejected) if pairs else torch.zeros(0)
