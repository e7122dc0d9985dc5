"""The negative-transfer guard: a fine-tuned adapter becomes the latest version of its name only when
it scores better than the base model on the job's validation data (or the request forces it).

`evaluate_result` turns a `TrainResult` into the job's `evaluation` record: base and adapter validation
loss and token accuracy, the gain (base loss - adapter loss, in nats per token: > 0 means the adapter
is better), the kept epoch, whether training stopped early, the reference-text perplexity with and
without the adapter (forgetting), and the promotion decision with its reason in words.
"""
from __future__ import annotations

from typing import Any

from loraplex.training.trainer import TrainResult

NO_VALIDATION = "no validation data (no validation_file and too few examples to hold some out)"


def evaluate_result(result: TrainResult, force: bool) -> dict[str, Any]:
    gain = accuracy_gain = None
    if result.valid_loss is not None and result.base_valid_loss is not None:
        gain = result.base_valid_loss - result.valid_loss
        accuracy_gain = result.valid_token_accuracy - result.base_valid_token_accuracy
    promoted, reason = _decide(gain, result, force)
    ppl_base, ppl_adapter = result.reference_perplexity_base, result.reference_perplexity_adapter
    return {
        "validation_source": result.validation_source,
        "num_valid_examples": result.num_valid_examples,
        "base_valid_loss": result.base_valid_loss,
        "adapter_valid_loss": result.valid_loss,
        "base_valid_mean_token_accuracy": result.base_valid_token_accuracy,
        "adapter_valid_mean_token_accuracy": result.valid_token_accuracy,
        "gain": gain,
        "accuracy_gain": accuracy_gain,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "epochs_run": len(result.epochs),
        "reference_perplexity_base": ppl_base,
        "reference_perplexity_adapter": ppl_adapter,
        "forgetting_ratio": ppl_adapter / ppl_base if ppl_base and ppl_adapter is not None else None,
        "promoted": promoted,
        "forced": force,
        "reason": reason,
    }


def _decide(gain: float | None, result: TrainResult, force: bool) -> tuple[bool, str]:
    if gain is None:
        return True, f"promoted without a comparison: {NO_VALIDATION}"
    scores = (f"validation loss {result.valid_loss:.4f} (adapter) vs {result.base_valid_loss:.4f} (base), "
              f"gain {gain:+.4f}")
    if gain > 0:
        return True, f"promoted: the adapter beats the base model, {scores}"
    if force:
        return True, f"promoted because the request forced it, although the adapter is not better: {scores}"
    return False, (f"not promoted: the adapter is not better than the base model, {scores}; it is kept as a "
                   f"version that must be named explicitly (force_promotion=true promotes anyway)")
