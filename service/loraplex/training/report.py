"""A fine-tuning job's report: loss curves and the base / incumbent / adapter comparison, as JSON and PNG.

The JSON is built from the job's own events (every logged step's training loss, every epoch's
validation score) and its `evaluation` record, so it says exactly what the events said. The PNG draws
that JSON with matplotlib's object API (no pyplot global state: safe in server threads).
"""
from __future__ import annotations

import io
from typing import Any

from loraplex.training.jobs import JobRecord

PNG_DPI = 100


def build_report(job: JobRecord, events: list[dict[str, Any]]) -> dict[str, Any]:
    """`events` oldest first, as the job store returns them."""
    train_curve, valid_curve = [], []
    for event in events:
        data = event.get("data") or {}
        if "valid_loss" in data:
            valid_curve.append({k: data[k] for k in ("epoch", "step", "train_loss", "valid_loss", "valid_mean_token_accuracy")})
        elif "learning_rate" in data:
            train_curve.append({k: data[k] for k in ("step", "epoch", "train_loss", "learning_rate")})
    return {
        "object": "fine_tuning.job.report",
        "fine_tuning_job_id": job.id,
        "status": job.status,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "hyperparameters": job.resolved_hyperparameters or job.hyperparameters,
        "train_curve": train_curve,
        "valid_curve": valid_curve,
        "evaluation": job.evaluation,
    }


def render_png(report: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.2), dpi=PNG_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    curves, validation, reference = figure.subplots(1, 3, width_ratios=[2.2, 1, 1])
    _draw_curves(curves, report)
    evaluation = report.get("evaluation") or {}
    _draw_bars(validation, "validation loss (lower is better)", _validation_bars(evaluation), _accuracy_note(evaluation))
    _draw_bars(reference, "reference-text perplexity (forgetting)",
               {"base": evaluation.get("reference_perplexity_base"), "adapter": evaluation.get("reference_perplexity_adapter")},
               _ratio_note(evaluation))
    figure.suptitle(_title(report), fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_curves(ax, report: dict[str, Any]) -> None:
    train, valid = report["train_curve"], report["valid_curve"]
    if train:
        ax.plot([p["step"] for p in train], [p["train_loss"] for p in train], color="tab:blue", lw=1, label="train loss")
    if valid:
        ax.plot([p["step"] for p in valid], [p["valid_loss"] for p in valid], "o-", color="tab:orange",
                label="validation loss (per epoch)")
    evaluation = report.get("evaluation") or {}
    if evaluation.get("base_valid_loss") is not None:
        ax.axhline(evaluation["base_valid_loss"], color="gray", ls="--", lw=1, label="base model, validation")
    if evaluation.get("best_step") is not None:
        ax.axvline(evaluation["best_step"], color="tab:green", ls=":", lw=1.5,
                   label=f"kept: epoch {evaluation['best_epoch']}" + (" (stopped early)" if evaluation.get("stopped_early") else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("loss curves", fontsize=10)
    if train or valid:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)


BAR_COLORS = {"base": "gray", "incumbent": "tab:blue", "adapter": "tab:orange"}


def _validation_bars(evaluation: dict[str, Any]) -> dict[str, float | None]:
    """base, the incumbent (when the name served one) and the new adapter, on the same validation examples."""
    bars = {"base": evaluation.get("base_valid_loss")}
    if evaluation.get("incumbent_valid_loss") is not None:
        bars[f"incumbent\n{evaluation.get('incumbent')}"] = evaluation["incumbent_valid_loss"]
    bars["adapter"] = evaluation.get("adapter_valid_loss")
    return bars


def _draw_bars(ax, title: str, values: dict[str, float | None], note: str) -> None:
    ax.set_title(title, fontsize=10)
    if any(value is None for value in values.values()):
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    colors = [BAR_COLORS[label.split("\n")[0]] for label in values]
    bars = ax.bar(list(values), list(values.values()), color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylim(0, max(values.values()) * 1.2)
    ax.text(0.5, -0.16, note, ha="center", transform=ax.transAxes, fontsize=8)


def _accuracy_note(evaluation: dict[str, Any]) -> str:
    if evaluation.get("gain") is None:
        return ""
    note = f"gain vs base {evaluation['gain']:+.3f} nats, 95% CI [{evaluation['gain_ci'][0]:+.3f}, {evaluation['gain_ci'][1]:+.3f}]"
    if evaluation.get("incumbent_gain") is not None:
        low, high = evaluation["incumbent_gain_ci"]
        note += f"\nvs incumbent {evaluation['incumbent_gain']:+.3f}, CI [{low:+.3f}, {high:+.3f}]"
    return note


def _ratio_note(evaluation: dict[str, Any]) -> str:
    ratio = evaluation.get("forgetting_ratio")
    return "" if ratio is None else f"adapter / base = {ratio:.2f}x"


def _title(report: dict[str, Any]) -> str:
    evaluation = report.get("evaluation") or {}
    decision = ("promoted" if evaluation.get("promoted") else "NOT promoted") if evaluation else report["status"]
    return f"{report['fine_tuning_job_id']}  {report.get('fine_tuned_model') or ''}  [{decision}]"
