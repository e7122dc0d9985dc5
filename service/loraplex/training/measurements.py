"""What a run measures once training is over, for the promotion decision and the report: the kept
adapter, the base model (adapter disabled) and the incumbent (the version its name serves now, loaded
beside it) on the same validation examples, each with per-example losses for the paired bootstrap;
general-text perplexity with and without the adapter; and the parent's validation loss before and
after (forgetting of a continued adapter).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.training.datasets import TokenizedDataset
from loraplex.training.evaluation import Score, perplexity, reference_text, reference_windows, score

INCUMBENT = "incumbent"  # the PEFT adapter name the incumbent is loaded under, deleted before saving


@dataclass(frozen=True)
class Measurements:
    adapter: Score | None = None  # the kept epoch's validation score
    base: Score | None = None
    incumbent: Score | None = None
    reference_perplexity_base: float | None = None
    reference_perplexity_adapter: float | None = None
    parent_valid_loss_before: float | None = None  # the parent's validation data, starting weights
    parent_valid_loss_after: float | None = None  # ... and the kept adapter
    num_parent_valid_examples: int = 0

    @property
    def base_valid_loss(self) -> float | None:
        return self.base.loss if self.base is not None else None


def parent_loss(model, parent_set: TokenizedDataset | None, pad_id: int, device, check) -> float | None:
    return score(model, parent_set, pad_id, device, check).loss if parent_set is not None else None


def measure(model, objective, tokenizer, pad_id: int, device, max_len: int, check, *, best, incumbent: Path | None,
            parent_set: TokenizedDataset | None, parent_before: float | None) -> Measurements:
    """`model` holds the kept weights as its active adapter, and still does when this returns."""
    windows = reference_windows(tokenizer, reference_text(), max_len)
    scores = {"reference_perplexity_adapter": perplexity(model, windows, pad_id, device, check),
              "parent_valid_loss_after": parent_loss(model, parent_set, pad_id, device, check)}
    has_validation = best is not None
    with model.disable_adapter():
        scores["reference_perplexity_base"] = perplexity(model, windows, pad_id, device, check)
        if has_validation:
            scores["base"] = objective.evaluate(model, check)
    if has_validation and incumbent is not None:
        scores["incumbent"] = _incumbent_score(model, objective, incumbent, check)
    return Measurements(adapter=best.score if has_validation else None, parent_valid_loss_before=parent_before,
                        num_parent_valid_examples=len(parent_set.examples) if parent_set is not None else 0, **scores)


def _incumbent_score(model, objective, incumbent: Path, check) -> Score:
    """The incumbent as a second adapter of `model`; one of another PEFT type (prompt tuning vs LoRA) cannot
    sit beside it, so it is scored on a fresh copy of the base."""
    incumbent_type = json.loads((incumbent / "adapter_config.json").read_text()).get("peft_type")
    if incumbent_type != model.active_peft_config.peft_type.value:
        return _score_on_fresh_base(model, objective, incumbent, check)
    model.load_adapter(str(incumbent), adapter_name=INCUMBENT)
    try:
        model.set_adapter(INCUMBENT)
        return objective.evaluate(model, check)
    finally:
        model.set_adapter("default")
        model.delete_adapter(INCUMBENT)


def _score_on_fresh_base(model, objective, incumbent: Path, check) -> Score:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = model.get_base_model()
    base = AutoModelForCausalLM.from_pretrained(base_model.config._name_or_path, dtype=base_model.dtype)
    other = PeftModel.from_pretrained(base.to(base_model.device), str(incumbent)).eval()
    return objective.evaluate(other, check)
