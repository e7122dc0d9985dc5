"""One record per measured system, whatever ran it (HTTP load or in-process baseline)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class RunResult:
    """A timed burst: `num_requests` requests arriving together at t=0, all served by `wall_s`."""

    system: str
    wall_s: float
    num_requests: int
    num_output_tokens: int
    latencies_s: list[float]  # per request: arrival (t=0) to last token
    ttfts_s: list[float] = field(default_factory=list)  # per request, when streamed
    notes: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s

    def to_dict(self) -> dict:
        out = {
            "system": self.system,
            "tokens_per_s": self.tokens_per_s,
            "wall_s": self.wall_s,
            "num_requests": self.num_requests,
            "num_output_tokens": self.num_output_tokens,
            "latency_s": percentiles(self.latencies_s),
            "notes": self.notes,
        }
        if self.ttfts_s:
            out["ttft_s"] = percentiles(self.ttfts_s)
        return out


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest rank, so each is a value that was measured) plus mean and max."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
            "mean": statistics.fmean(ordered), "max": ordered[-1]}


def median_run(runs: list[RunResult]) -> RunResult:
    """The repeat with the median throughput (a measured run, not an average of runs)."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.notes = (chosen.notes + f" median of {len(runs)} repeats "
                    f"({', '.join(f'{r.tokens_per_s:.1f}' for r in runs)} tok/s)").strip()
    return chosen
