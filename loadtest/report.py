"""Ratios against the targets, the printed table, bench.json and bench.png."""
from __future__ import annotations

import json
from pathlib import Path

# (name, numerator system, denominator system, target): every ratio is tokens/s over tokens/s.
# A target of None marks a ratio reported for context only.
RATIOS = [
    ("a_adapters_vs_base", "loraplex_adapters", "loraplex_base", 0.85),
    ("b_vs_hf_peft_mixed", "loraplex_adapters", "hf_peft_mixed", 3.0),
    ("c_vs_hf_peft_naive", "loraplex_adapters", "hf_peft_naive", 8.0),
    ("hf_mixed_vs_naive", "hf_peft_mixed", "hf_peft_naive", None),
]


def compute_ratios(systems: dict[str, dict]) -> dict[str, dict]:
    """Each ratio from the reported tokens/s of two measured systems; skipped if either did not run."""
    out = {}
    for name, num, den, target in RATIOS:
        if num in systems and den in systems:
            value = systems[num]["tokens_per_s"] / systems[den]["tokens_per_s"]
            out[name] = {"numerator": num, "denominator": den, "value": value, "target": target,
                         "passed": None if target is None else value >= target}
    return out


def print_report(results: dict) -> None:
    setup, wl = results["setup"], results["workload"]
    print("\n== loraplex benchmark ==")
    print(f"device {setup['device']} ({setup['device_name']}), dtype {setup['dtype']}, torch {setup['torch']}, "
          f"{setup['cpu_count']} CPUs ({setup['torch_threads']} torch threads), "
          f"load average at start {setup['load_avg_1m']:.2f}")
    print(f"model: random-weight Llama, {results['model']['num_params'] / 1e6:.3g}M params, "
          f"{_shape(wl['shape'])}")
    print(f"workload: {wl['num_requests']} concurrent requests x {wl['prompt_len']} prompt tokens -> "
          f"{wl['new_tokens']} new tokens; {wl['num_adapters']} adapters r={wl['lora_rank']} on "
          f"{','.join(wl['target_modules'])}; same seeded prompts for every system")
    print(f"\n{'system':<24}{'tok/s':>10}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}  notes")
    for name, sys_ in results["systems"].items():
        lat = sys_["latency_s"]
        print(f"{name:<24}{sys_['tokens_per_s']:>10.1f}{sys_['wall_s']:>9.2f}{lat['p50']:>8.2f}"
              f"{lat['p99']:>8.2f}  {sys_['notes']}")
    if results["ratios"]:
        print(f"\n{'ratio':<22}{'value':>8}{'target':>8}  result")
        for name, r in results["ratios"].items():
            target = "-" if r["target"] is None else f"{r['target']:.2f}"
            verdict = {True: "PASS", False: "FAIL", None: "info"}[r["passed"]]
            print(f"{name:<22}{r['value']:>8.2f}{target:>8}  {verdict}  ({r['numerator']} / {r['denominator']})")
    _print_roofline(results.get("roofline"), results.get("loraplex", {}).get("first_token"))
    _print_engine_sections(results.get("merge"), results.get("cold_load"))
    if setup["load_avg_1m"] > 0.5 * setup["cpu_count"]:
        print(f"\nWARNING: load average {setup['load_avg_1m']:.2f} on {setup['cpu_count']} CPUs at start: other "
              "work was running, so these numbers are not reliable (CPU thread pools stall when oversubscribed)")


def _print_engine_sections(merge: dict | None, cold: dict | None) -> None:
    if merge:
        t = merge["tpot_s"]
        print(f"\nmerged serving ({merge['notes']}):")
        print(f"  per-token latency ms: base {t['base'] * 1e3:.2f}, unmerged {t['unmerged'] * 1e3:.2f}, merged {t['merged'] * 1e3:.2f}")
        for name, mix in merge["mixes"].items():
            print(f"  {name}: unmerged {mix['unmerged']:.1f} tok/s, auto {mix['auto']:.1f} tok/s ({mix['switches']} merge switches)")
        for name, r in merge["ratios"].items():
            target = "-" if r["target"] is None else f"{r['target']:.2f}"
            print(f"  {name:<28}{r['value']:>7.3f}{target:>7}  {({True: 'PASS', False: 'FAIL', None: 'info'})[r['passed']]}")
        print(f"  switch time: merge {merge['switch_s']['merge_p50'] * 1e3:.1f} ms, unmerge {merge['switch_s']['unmerge_p50'] * 1e3:.1f} ms")
    if cold:
        steps = cold["decode_step_s"]
        print(f"\ncold adapter loads ({cold['notes']}): {cold['num_loads']} loads, "
              f"p50 {_ms(cold['load_s']['p50'])} ms, p95 {_ms(cold['load_s']['p95'])} ms; decode step p50 "
              f"{_ms(steps['without_loads_p50'])} ms without loads, {_ms(steps['during_loads_p50'])} ms during loads")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _print_roofline(roof: dict | None, first_token: dict | None) -> None:
    if first_token:
        print(f"\nTTFT, all requests at once (1-token burst): p50 {first_token['latency_s']['p50']:.2f} s, "
              f"max {first_token['latency_s']['max']:.2f} s")
    if not roof:
        return
    machine, start, end = roof["machine"], roof["at_start"], roof["at_end"]
    print(f"\nroofline: bandwidth {machine['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (tensor sum/copy; "
          f"{start['bandwidth']['bytes_per_s'] / 1e9:.1f} at start, {end['bandwidth']['bytes_per_s'] / 1e9:.1f} at end), "
          f"matmul peak {machine['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s ({machine['matmul']['n']}^3; "
          f"{start['matmul']['flops_per_s'] / 1e9:.0f} at start, {end['matmul']['flops_per_s'] / 1e9:.0f} at end)")
    if "decode" in roof:
        d = roof["decode"]
        print(f"base decode at batch {d['batch_size']}: bound {d['roofline_s'] * 1e3:.3g} ms/step "
              f"({d['bound_by']}; memory {d['memory_bound_s'] * 1e3:.3g} ms, compute {d['compute_bound_s'] * 1e3:.3g} ms), "
              f"achieved {d['achieved_step_s'] * 1e3:.3g} ms/step -> efficiency {d['efficiency']:.1%}")


def _shape(shape: dict) -> str:
    return (f"hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
            f"/ {shape['num_key_value_heads']} kv, ffn {shape['intermediate_size']}, vocab {shape['vocab_size']}")


def write_json(results: dict, path: Path, indent: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent) + "\n")


def write_plot(results: dict, path: Path) -> None:
    """Left: tokens/s per system, dashed lines where the targets put loraplex_adapters. Right: latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    names = list(systems)
    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = ax_tps.bar(names, [systems[n]["tokens_per_s"] for n in names], color="tab:blue")
    ax_tps.bar_label(bars, fmt="%.0f")
    for r in results["ratios"].values():  # the throughput loraplex_adapters needs to meet each target
        if r["target"] is not None:
            needed = systems[r["denominator"]]["tokens_per_s"] * r["target"]
            ax_tps.axhline(needed, color="tab:red", linestyle="--", linewidth=0.8)
            ax_tps.annotate(f"target vs {r['denominator']}", (len(names) - 0.5, needed), fontsize=7,
                            ha="right", va="bottom", color="tab:red")
    ax_tps.set_ylabel("output tokens/s")
    ax_tps.set_title("throughput (higher is better)")
    width = 0.25
    for k, q in enumerate(["p50", "p90", "p99"]):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax_lat.bar(xs, [systems[n]["latency_s"][q] for n in names], width, label=q)
    ax_lat.set_xticks(range(len(names)), names)
    ax_lat.set_ylabel("request latency (s)")
    ax_lat.set_title("latency, all requests sent at t=0 (lower is better)")
    ax_lat.legend()
    for ax in (ax_tps, ax_lat):
        ax.tick_params(axis="x", labelrotation=20)
    setup, wl = results["setup"], results["workload"]
    fig.suptitle(f"loraplex bench: {results['model']['num_params'] / 1e6:.3g}M Llama, {wl['num_requests']} req x "
                 f"{wl['prompt_len']}+{wl['new_tokens']} tok, {setup['device']} {setup['dtype']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
