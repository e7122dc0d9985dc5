"""Smoke tests of the benchmark (loadtest/): tiny model, a few requests, numbers that add up."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from loadtest import bench, report, roofline  # importable: pyproject puts "." and "service" on the path


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _has_server() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("loraplex.cli", "loraplex.api.app"))


def _check_systems(results: dict, expected: set[str]) -> None:
    assert set(results["systems"]) == expected
    wl = results["workload"]
    for name, system in results["systems"].items():
        assert _is_number(system["tokens_per_s"]) and _is_number(system["wall_s"]), name
        assert system["num_output_tokens"] == system["num_requests"] * wl["new_tokens"], name
        assert system["tokens_per_s"] == pytest.approx(system["num_output_tokens"] / system["wall_s"])
        assert all(_is_number(v) for v in system["latency_s"].values()), name


def _check_ratios(results: dict) -> None:
    systems = results["systems"]
    for name, ratio in results["ratios"].items():
        expected = systems[ratio["numerator"]]["tokens_per_s"] / systems[ratio["denominator"]]["tokens_per_s"]
        assert ratio["value"] == pytest.approx(expected), name
        assert ratio["passed"] is (None if ratio["target"] is None else ratio["value"] >= ratio["target"])


def test_baselines_and_roofline_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    results = bench.main(["--quick", "--no-server", "--work-dir", str(tmp_path / "work"), "--out", str(out)])

    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(results))  # what was printed is what was written
    assert (out / "bench.png").stat().st_size > 0
    assert saved["setup"]["device"] in ("cpu", "cuda") and saved["setup"]["dtype"] in ("float32", "bfloat16")
    assert saved["workload"]["num_requests"] == 4 and saved["workload"]["new_tokens"] == 8
    _check_systems(saved, {"hf_peft_mixed", "hf_peft_naive"})
    assert set(saved["ratios"]) == {"hf_mixed_vs_naive"}  # the loraplex ratios need the server section
    _check_ratios(saved)

    machine = saved["roofline"]["machine"]
    assert _is_number(machine["bandwidth"]["bytes_per_s"]) and _is_number(machine["matmul"]["flops_per_s"])
    bound = roofline.decode_step_bound(machine, num_params=saved["model"]["num_params"], dtype_bytes=4, batch_size=4)
    assert bound["memory_bound_s"] == pytest.approx(saved["model"]["num_params"] * 4 / machine["bandwidth"]["bytes_per_s"])
    assert bound["roofline_s"] == max(bound["memory_bound_s"], bound["compute_bound_s"])
    assert roofline.efficiency(bound, 2 * bound["roofline_s"])["efficiency"] == pytest.approx(0.5)


def test_ratio_targets() -> None:
    systems = {name: {"tokens_per_s": tps} for name, tps in
               [("loraplex_adapters", 900.0), ("loraplex_base", 1000.0), ("hf_peft_mixed", 300.0), ("hf_peft_naive", 100.0)]}
    ratios = report.compute_ratios(systems)
    assert {k: (round(r["value"], 6), r["passed"]) for k, r in ratios.items()} == {
        "a_adapters_vs_base": (0.9, True),
        "b_vs_hf_peft_mixed": (3.0, True),
        "c_vs_hf_peft_naive": (9.0, True),
        "hf_mixed_vs_naive": (3.0, None),
    }
    assert not report.compute_ratios({**systems, "loraplex_base": {"tokens_per_s": 1100.0}})["a_adapters_vs_base"]["passed"]


@pytest.mark.skipif(not _has_server(), reason="loraplex server (loraplex.cli, loraplex.api.app) not in the tree yet")
def test_quick_end_to_end_through_server(tmp_path: Path) -> None:
    out = tmp_path / "results"
    results = bench.main(["--quick", "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)])

    saved = json.loads((out / "bench.json").read_text())
    _check_systems(saved, {"loraplex_base", "loraplex_adapters", "hf_peft_mixed", "hf_peft_naive"})
    assert set(saved["ratios"]) == {"a_adapters_vs_base", "b_vs_hf_peft_mixed", "c_vs_hf_peft_naive",
                                    "hf_mixed_vs_naive"}
    _check_ratios(saved)
    decode = saved["roofline"]["decode"]
    assert _is_number(decode["achieved_step_s"]) and _is_number(decode["efficiency"])
    assert decode["achieved_step_s"] == results["loraplex"]["decode_step_s"]
    first_token = saved["loraplex"]["first_token"]
    assert first_token["num_output_tokens"] == first_token["num_requests"]  # max_tokens=1
    assert first_token["latency_s"]["p50"] < saved["loraplex"]["dedicated"]["latency_s"]["p50"]
