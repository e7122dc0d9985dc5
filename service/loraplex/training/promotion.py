"""Champion vs challenger: a fine-tuned adapter becomes the latest version of its name only when, on the
job's validation examples, it beats both the base model and the incumbent (the version the name serves
now) by a margin whose sign a paired bootstrap trusts, and it does not wreck general text (reference
perplexity at most `max_forgetting_ratio` x the base's). `force_promotion` overrides.

Paired bootstrap: resample the validation examples with replacement NUM_BOOTSTRAP times; each time,
gain = (opponent's summed loss - adapter's summed loss) / label tokens over the same resampled
examples. The adapter beats the opponent when the lower end of the CONFIDENCE interval is above 0.

`evaluate_result` turns a `TrainResult` into the job's `evaluation` record (field names are stable; the
README lists them): every score, each gain with its interval, forgetting, the decision and its reason.
"""
from __future__ import annotations

from typing import Any

import torch

from loraplex.training.evaluation import Score
from loraplex.training.trainer import TrainResult

CONFIDENCE = 0.95
NUM_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0  # a fixed seed: the same scores always give the same interval
NO_VALIDATION = "no validation data (no validation_file and too few examples to hold some out)"


def paired_bootstrap(adapter: Score, opponent: Score, num_samples: int = NUM_BOOTSTRAP) -> tuple[float, float, float]:
    """(gain, low, high): the opponent's loss minus the adapter's on the whole set, and its interval."""
    adapter_losses = torch.tensor(adapter.example_losses, dtype=torch.float64)  # [N]
    opponent_losses = torch.tensor(opponent.example_losses, dtype=torch.float64)  # [N]
    tokens = torch.tensor(adapter.example_tokens, dtype=torch.float64)  # [N]
    gain = float((opponent_losses.sum() - adapter_losses.sum()) / tokens.sum().clamp(min=1))
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    picks = torch.randint(len(tokens), (num_samples, len(tokens)), generator=generator)  # [S, N]
    gains = (opponent_losses[picks].sum(1) - adapter_losses[picks].sum(1)) / tokens[picks].sum(1).clamp(min=1)  # [S]
    tail = (1 - CONFIDENCE) / 2
    low, high = torch.quantile(gains, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return gain, low, high


def evaluate_result(result: TrainResult, force: bool, incumbent_id: str | None = None,
                    parent_model: str | None = None) -> dict[str, Any]:
    m, hp = result.measurements, result.hyperparameters
    record: dict[str, Any] = {
        "method": result.method, "validation_source": result.validation_source,
        "num_valid_examples": result.num_valid_examples, "initial_valid_loss": result.initial_valid_loss,
        "confidence_level": CONFIDENCE, "num_bootstrap_samples": NUM_BOOTSTRAP,
        **_scores("base", m.base, result.method), **_scores("adapter", m.adapter, result.method),
        "incumbent": incumbent_id if m.incumbent is not None else None,
        **_scores("incumbent", m.incumbent, result.method),
        **_comparison("", m.adapter, m.base), **_comparison("incumbent_", m.adapter, m.incumbent),
        "best_epoch": result.best_epoch, "best_step": result.best_step, "stopped_early": result.stopped_early,
        "epochs_run": len(result.epochs),
        **_forgetting(result), "max_forgetting_ratio": hp.max_forgetting_ratio,
        "parent_model": parent_model, "parent_valid_loss_before": m.parent_valid_loss_before,
        "parent_valid_loss_after": m.parent_valid_loss_after, "num_parent_valid_examples": m.num_parent_valid_examples,
        "parent_forgetting": _difference(m.parent_valid_loss_after, m.parent_valid_loss_before),
        "replay_fraction": hp.replay_fraction, "num_replayed_per_epoch": result.num_replayed_per_epoch,
    }
    if result.method != "dpo" and m.adapter is not None and m.base is not None:
        record["accuracy_gain"] = m.adapter.token_accuracy - m.base.token_accuracy
    else:
        record["accuracy_gain"] = None
    blocked_by, reasons = _blockers(record)
    record.update(promoted=force or not blocked_by, forced=force, blocked_by=blocked_by,
                  reason=_reason(record, blocked_by, reasons, force))
    return record


def _scores(who: str, score: Score | None, method: str) -> dict[str, Any]:
    loss = score.loss if score is not None else None
    if method == "dpo":
        return {f"{who}_valid_loss": loss, f"{who}_valid_mean_token_accuracy": None,
                f"{who}_valid_preference_accuracy": score.token_accuracy if score is not None else None,
                f"{who}_valid_reward_margin": score.reward_margin if score is not None else None}
    return {f"{who}_valid_loss": loss, f"{who}_valid_mean_token_accuracy": score.token_accuracy if score is not None else None}


def _comparison(prefix: str, adapter: Score | None, opponent: Score | None) -> dict[str, Any]:
    if adapter is None or opponent is None:
        return {f"{prefix}gain": None, f"{prefix}gain_ci": None}
    gain, low, high = paired_bootstrap(adapter, opponent)
    return {f"{prefix}gain": gain, f"{prefix}gain_ci": [low, high]}


def _forgetting(result: TrainResult) -> dict[str, Any]:
    base, adapter = result.measurements.reference_perplexity_base, result.measurements.reference_perplexity_adapter
    return {"reference_perplexity_base": base, "reference_perplexity_adapter": adapter,
            "forgetting_ratio": adapter / base if base and adapter is not None else None}


def _difference(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None


def _blockers(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What stops promotion ("base", "incumbent", "forgetting") and each reason in words."""
    blocked_by, reasons = [], []
    level = f"{CONFIDENCE:.0%}"
    for who, prefix, name in (("base", "", "the base model"), ("incumbent", "incumbent_", f"the incumbent {record['incumbent']}")):
        gain, ci = record[f"{prefix}gain"], record[f"{prefix}gain_ci"]
        if gain is not None and not ci[0] > 0:
            blocked_by.append(who)
            reasons.append(f"not better than {name}: validation loss {record['adapter_valid_loss']:.4f} vs "
                           f"{record[f'{who}_valid_loss']:.4f}, gain {gain:+.4f}, {level} CI [{ci[0]:+.4f}, {ci[1]:+.4f}] "
                           f"does not exclude 0")
    ratio = record["forgetting_ratio"]
    if ratio is not None and ratio > record["max_forgetting_ratio"]:
        blocked_by.append("forgetting")
        reasons.append(f"it forgets general text: reference perplexity {record['reference_perplexity_base']:.4g} -> "
                       f"{record['reference_perplexity_adapter']:.4g} ({ratio:.3g}x, above max_forgetting_ratio "
                       f"{record['max_forgetting_ratio']:g})")
    return blocked_by, reasons


def _reason(record: dict[str, Any], blocked_by: list[str], reasons: list[str], force: bool) -> str:
    if blocked_by and force:
        return f"promoted because the request forced it, although {'; '.join(reasons)}"
    if blocked_by:
        return (f"not promoted: {'; '.join(reasons)}. It is kept as a version that must be named explicitly "
                f"(force_promotion=true promotes anyway)")
    if record["gain"] is None:
        return f"promoted without a comparison: {NO_VALIDATION}"
    beaten = [f"the base model (gain {record['gain']:+.4f}, CI [{record['gain_ci'][0]:+.4f}, {record['gain_ci'][1]:+.4f}])"]
    if record["incumbent_gain"] is not None:
        ci = record["incumbent_gain_ci"]
        beaten.append(f"the incumbent {record['incumbent']} (gain {record['incumbent_gain']:+.4f}, CI [{ci[0]:+.4f}, {ci[1]:+.4f}])")
    return f"promoted: the adapter beats {' and '.join(beaten)}"
