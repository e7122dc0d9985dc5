"""A fine-tuning job's report: loss curves and the base-vs-adapter comparison, as JSON and as a PNG.

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
    _draw_pair(validation, "validation loss (lower is better)", evaluation.get("base_valid_loss"),
               evaluation.get("adapter_valid_loss"), _accuracy_note(evaluation))
    _draw_pair(reference, "reference-text perplexity (forgetting)", evaluation.get("reference_perplexity_base"),
               evaluation.get("reference_perplexity_adapter"), _ratio_note(evaluation))
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


def _draw_pair(ax, title: str, base: float | None, adapter: float | None, note: str) -> None:
    ax.set_title(title, fontsize=10)
    if base is None or adapter is None:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    bars = ax.bar(["base", "adapter"], [base, adapter], color=["gray", "tab:orange"])
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylim(0, max(base, adapter) * 1.2)
    ax.text(0.5, -0.16, note, ha="center", transform=ax.transAxes, fontsize=8)


def _accuracy_note(evaluation: dict[str, Any]) -> str:
    base, adapter = evaluation.get("base_valid_mean_token_accuracy"), evaluation.get("adapter_valid_mean_token_accuracy")
    if base is None or adapter is None:
        return ""
    return f"token accuracy {base:.2f} -> {adapter:.2f}; gain {evaluation['gain']:+.3f} nats"


def _ratio_note(evaluation: dict[str, Any]) -> str:
    ratio = evaluation.get("forgetting_ratio")
    return "" if ratio is None else f"adapter / base = {ratio:.2f}x"


def _title(report: dict[str, Any]) -> str:
    evaluation = report.get("evaluation") or {}
    decision = ("promoted" if evaluation.get("promoted") else "NOT promoted") if evaluation else report["status"]
    return f"{report['fine_tuning_job_id']}  {report.get('fine_tuned_model') or ''}  [{decision}]"
