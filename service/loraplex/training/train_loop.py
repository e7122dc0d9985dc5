"""The optimizer loop of one run: AdamW over the LoRA weights (one group per layer, warmup then linear
decay), the objective's batches epoch by epoch, progress events, a validation score after every epoch
fed to early stopping, and the cancel check before every step."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.training.hyperparams import ResolvedHyperparameters, learning_rate_at
from loraplex.training.transfer import BestEpoch, EpochScore, param_groups

MAX_EVENTS_PER_RUN = 1000  # long runs report every k steps so job event logs stay small
MAX_GRAD_NORM = 1.0


class TrainingCancelled(Exception):
    """`should_stop()` returned True; nothing was written to `out_dir`."""

    def __init__(self, step: int):
        super().__init__(f"training cancelled after {step} steps")
        self.step = step


@dataclass(frozen=True)
class TrainEvent:
    step: int  # 1-based optimizer step just finished
    epoch: int  # 1-based
    loss: float  # mean training loss over the steps since the previous event
    learning_rate: float
    num_steps_total: int
    elapsed_s: float  # since the optimizer loop started


class TrainLoop:
    """The optimizer loop; holds the step counter and running losses the result reports."""

    def __init__(self, model, hp: ResolvedHyperparameters, num_layers: int, objective, on_event, should_stop):
        self.model, self.hp, self.objective = model, hp, objective
        self.on_event, self.should_stop = on_event, should_stop
        self.named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}  # LoRA A/B only
        groups = param_groups(model, hp, num_layers)
        self.optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.trainable = list(self.named_trainable.values())
        self.step = 0
        self.num_tokens = 0
        self.last_epoch_loss = math.nan
        self.last_lr = 0.0
        self.stopped_early = False
        self.event_every = max(1, math.ceil(hp.num_steps / MAX_EVENTS_PER_RUN))
        self.started = time.monotonic()

    def check(self) -> None:
        if self.should_stop():
            raise TrainingCancelled(self.step)

    def run(self, save_checkpoint: Callable[[int], Path] | None, checkpoint_every_epochs: int | None,
            has_validation: bool, tracker: BestEpoch, on_epoch) -> list[Path]:
        """Train until the step budget or early stopping; `save_checkpoint(epoch)` every k epochs."""
        checkpoints = []
        pending: list[float] = []  # losses since the last event
        for epoch in range(1, self.hp.n_epochs + 1):
            self.model.train()
            epoch_losses = []
            for batch in self.objective.epoch_batches(epoch):
                if self.step >= self.hp.num_steps:
                    break
                self.check()
                loss = self._optimizer_step(batch)
                epoch_losses.append(loss)
                pending.append(loss)
                if self.step % self.event_every == 0 or self.step == self.hp.num_steps:
                    self._emit(epoch, sum(pending) / len(pending))
                    pending = []
            if epoch_losses:
                self.last_epoch_loss = sum(epoch_losses) / len(epoch_losses)
            if has_validation and epoch_losses:
                valid = self.objective.evaluate(self.model, self.check)
                epoch_score = EpochScore(epoch, self.step, self.last_epoch_loss, valid.loss, valid.token_accuracy,
                                         valid.reward_margin, valid)
                tracker.update(epoch_score, self.named_trainable)
                on_epoch(epoch_score)
                if tracker.should_stop() and self.step < self.hp.num_steps:
                    self.stopped_early = True
                    break
            if self.step >= self.hp.num_steps:
                break
            if checkpoint_every_epochs and epoch % checkpoint_every_epochs == 0:
                checkpoints.append(save_checkpoint(epoch))
        return checkpoints

    def _optimizer_step(self, batch) -> float:
        lr = learning_rate_at(self.step, self.hp.num_steps, self.hp.learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # layer-wise decay: the top layer trains at `lr`
        loss, num_tokens = self.objective.loss(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.num_tokens += num_tokens
        self.last_lr = lr
        return float(loss.detach())

    def _emit(self, epoch: int, loss: float) -> None:
        elapsed = time.monotonic() - self.started
        self.on_event(TrainEvent(self.step, epoch, loss, self.last_lr, self.hp.num_steps, elapsed))
