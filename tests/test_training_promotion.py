"""Champion vs challenger, without a model: the paired bootstrap trusts a consistent gain and not noise,
and the decision names what blocked it (base, incumbent, forgetting) unless forced."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraplex.training.evaluation import Score
from loraplex.training.hyperparams import Hyperparameters
from loraplex.training.measurements import Measurements
from loraplex.training.promotion import evaluate_result, paired_bootstrap
from loraplex.training.trainer import TrainResult


def scores(losses: list[float]) -> Score:
    tokens = [2] * len(losses)
    return Score(sum(losses) / sum(tokens), 0.5, sum(tokens), tuple(losses), tuple(tokens))


def noisy(center: float, spread: float, num: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [max(0.0, center + rng.uniform(-spread, spread)) for _ in range(num)]


def test_paired_bootstrap_trusts_a_consistent_gain_and_not_noise():
    base = noisy(4.0, 1.0, 60, seed=0)
    better = [loss - 0.5 for loss in base]  # every example 0.5 lower: per token 0.25
    gain, low, high = paired_bootstrap(scores(better), scores(base))
    assert gain == pytest.approx(0.25) and 0 < low <= gain <= high
    same_on_average = [loss + random.Random(i).choice((-0.4, 0.4)) for i, loss in enumerate(base)]
    gain, low, high = paired_bootstrap(scores(same_on_average), scores(base))
    assert low < 0 < high  # a coin-flip difference is not trusted
    assert paired_bootstrap(scores(better), scores(base)) == paired_bootstrap(scores(better), scores(base))  # seeded


def result(adapter: list[float], base: list[float], incumbent: list[float] | None = None,
           ppl: tuple[float, float] = (10.0, 11.0), **hp) -> TrainResult:
    measurements = Measurements(adapter=scores(adapter), base=scores(base),
                                incumbent=scores(incumbent) if incumbent else None,
                                reference_perplexity_base=ppl[0], reference_perplexity_adapter=ppl[1])
    return TrainResult(out_dir=Path("x"), num_steps=1, final_loss=1.0, train_tokens=1, elapsed_s=1.0,
                       hyperparameters=Hyperparameters(**hp).resolve(10), device="cpu", num_examples=10,
                       num_truncated=0, num_dropped=0, validation_source="file", num_valid_examples=len(adapter),
                       measurements=measurements)


BASE = noisy(4.0, 1.0, 40, seed=1)
GOOD = [loss - 2.0 for loss in BASE]
WORSE_THAN_GOOD = [loss - 1.0 for loss in BASE]  # beats the base, not the incumbent


def test_promoted_only_when_it_beats_the_base_and_the_incumbent():
    first = evaluate_result(result(GOOD, BASE), force=False)
    assert first["promoted"] and first["blocked_by"] == [] and first["gain_ci"][0] > 0
    assert first["incumbent"] is None and first["incumbent_gain"] is None
    assert first["reason"].startswith("promoted: the adapter beats the base model (gain +1.0000, CI [")

    challenger = evaluate_result(result(WORSE_THAN_GOOD, BASE, incumbent=GOOD), force=False, incumbent_id="t/x@1")
    assert not challenger["promoted"] and challenger["blocked_by"] == ["incumbent"]
    assert challenger["gain"] > 0 and challenger["incumbent_gain"] == pytest.approx(-0.5)
    assert challenger["incumbent_gain_ci"][1] < 0 and challenger["incumbent_valid_loss"] < challenger["adapter_valid_loss"]
    assert "not better than the incumbent t/x@1" in challenger["reason"] and "95% CI" in challenger["reason"]

    forced = evaluate_result(result(WORSE_THAN_GOOD, BASE, incumbent=GOOD), force=True, incumbent_id="t/x@1")
    assert forced["promoted"] and forced["forced"] and forced["reason"].startswith("promoted because the request forced it")

    beats_both = evaluate_result(result([loss - 3.0 for loss in BASE], BASE, incumbent=GOOD), False, "t/x@1")
    assert beats_both["promoted"] and "and the incumbent t/x@1" in beats_both["reason"]


def test_forgetting_above_the_threshold_blocks_promotion():
    wrecked = evaluate_result(result(GOOD, BASE, ppl=(16.4, 230_204.0)), force=False)
    assert not wrecked["promoted"] and wrecked["blocked_by"] == ["forgetting"]
    assert wrecked["forgetting_ratio"] == pytest.approx(230_204 / 16.4) and wrecked["max_forgetting_ratio"] == 2.0
    assert "forgets general text" in wrecked["reason"] and "above max_forgetting_ratio 2" in wrecked["reason"]
    tolerant = evaluate_result(result(GOOD, BASE, ppl=(16.4, 230_204.0), max_forgetting_ratio=1e5), force=False)
    assert tolerant["promoted"]
    assert evaluate_result(result(GOOD, BASE, ppl=(16.4, 230_204.0)), force=True)["promoted"]
