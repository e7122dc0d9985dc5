"""The concurrency sweep's report: printed setup and table, the JSON, the PNG, the README table.

`results` is what loadtest/sweep.py collects: {"setup": {...}, "mix": {...}, "server": {...},
"levels": [{"concurrency": N, <the locustfile's summary>}, ...]}.
"""
from __future__ import annotations

from pathlib import Path

from loadtest import report

PERCENTILES = ("p50", "p90", "p99")


def print_report(results: dict) -> None:
    setup, mix = results["setup"], results["mix"]
    print("\n== loraplex load test: throughput and latency vs concurrency ==")
    print(f"machine: {setup['cpu_count']} CPU cores ({setup['device_name']}), device {setup['device']}, "
          f"dtype {setup['dtype']}, torch {setup['torch']}, load average at start {setup['load_avg_1m']:.2f}")
    print(f"model: {setup['model']}; server {_server_line(results['server'])}")
    print(f"mix: {describe_mix(mix)}")
    print(f"levels: {', '.join(str(lv['concurrency']) for lv in results['levels'])} users, "
          f"{setup['duration_s']:g} s each ({setup['warmup_s']:g} s warm-up not measured); "
          "locust and the server share the machine")
    print()
    print(markdown_table(results))
    print("\nas the server saw each level (engine-side means, warm-up and drain included):")
    for lv in results["levels"]:
        side = lv.get("server_side") or {}
        means = ", ".join(f"{key} {side[f'{key}_mean_s'] * 1000:.0f} ms" for key in ("queue", "ttft", "e2e")
                          if side.get(f"{key}_mean_s") is not None)
        print(f"{lv['concurrency']:>4} users: {means}; adapter loads {side.get('adapter_loads', 0):.0f}, "
              f"evictions {side.get('adapter_evictions', 0):.0f}")


def describe_mix(mix: dict) -> str:
    words = mix["prompt_words"]
    return (f"{mix['num_tenants']} tenants x {mix['adapters_per_tenant']} adapters = {mix['num_adapters']} "
            f"(r<={mix['lora_rank']}), Zipf s={mix['zipf_s']:g} (top adapter {mix['top_adapter_share']:.0%} "
            f"of requests), base model {mix['base_share']:.0%}, chat {mix['chat_share']:.0%} / completions "
            f"{1 - mix['chat_share']:.0%}, streamed {mix['stream_share']:.0%}, prompts {words[0]}-{words[1]} "
            f"words, max_tokens {max(1, mix['max_tokens'] // 2)}-{mix['max_tokens']} (ignore_eos)")


def markdown_table(results: dict) -> str:
    head = ("| users | requests/s | output tokens/s | TTFT p50 / p90 / p99 (ms) | end-to-end p50 / p90 / p99 (ms) "
            "| requests | failures |")
    rows = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lv in results["levels"]:
        rows.append(f"| {lv['concurrency']} | {lv['requests_per_s']:.1f} | {lv['output_tokens_per_s']:.0f} | "
                    f"{_ms_triple(lv.get('ttft_s'))} | {_ms_triple(lv.get('e2e_s'))} | {lv['num_requests']} | "
                    f"{lv['num_failures']} |")
    return "\n".join(rows)


def write_json(results: dict, path: Path) -> None:
    report.write_json(results, path, indent=1)


def write_plot(results: dict, path: Path) -> None:
    """Two panels: throughput (tokens/s, requests/s on a second axis) and latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    levels = results["levels"]
    users = [lv["concurrency"] for lv in levels]
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))

    ax_tput.plot(users, [lv["output_tokens_per_s"] for lv in levels], "o-", color="tab:blue", label="output tokens/s")
    ax_tput.set_xlabel("concurrent users")
    ax_tput.set_ylabel("output tokens/s", color="tab:blue")
    ax_tput.set_ylim(bottom=0)
    ax_req = ax_tput.twinx()
    ax_req.plot(users, [lv["requests_per_s"] for lv in levels], "s--", color="tab:orange", label="requests/s")
    ax_req.set_ylabel("requests/s", color="tab:orange")
    ax_req.set_ylim(bottom=0)
    ax_tput.set_title("Throughput")
    lines = ax_tput.get_lines() + ax_req.get_lines()
    ax_tput.legend(lines, [ln.get_label() for ln in lines], loc="upper left")

    for key, label, color in (("ttft_s", "TTFT", "tab:green"), ("e2e_s", "end-to-end", "tab:red")):
        for pct, style in zip(PERCENTILES, ("o-", "s--", "^:")):
            points = [(u, lv[key][pct] * 1000) for u, lv in zip(users, levels) if lv.get(key)]
            if points:
                ax_lat.plot(*zip(*points), style, color=color, label=f"{label} {pct}")
    ax_lat.set_xlabel("concurrent users")
    ax_lat.set_ylabel("latency (ms, log scale)")
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax_lat.yaxis.set_major_formatter(ScalarFormatter())
    ax_lat.set_title("Latency percentiles")
    ax_lat.legend(ncol=2, fontsize="small")

    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [str(u) for u in users])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    setup = results["setup"]
    mix = results["mix"]
    fig.suptitle(f"loraplex load test ({setup['device']}, {setup['cpu_count']} cores): {mix['num_adapters']} adapters "
                 f"over {mix['num_tenants']} tenants, Zipf s={mix['zipf_s']:g}, {mix['base_share']:.0%} base, "
                 f"{mix['chat_share']:.0%} chat, {mix['stream_share']:.0%} streamed, {setup['duration_s']:g} s per level")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms_triple(pcts: dict | None) -> str:
    if not pcts:
        return "-"
    return " / ".join(f"{pcts[p] * 1000:.0f}" for p in PERCENTILES)


def _server_line(server: dict) -> str:
    env = server.get("env", {})
    fields = ("LORAPLEX_MAX_LORAS", "LORAPLEX_MAX_NUM_SEQS", "LORAPLEX_MAX_MODEL_LEN")
    return ", ".join(f"{k.removeprefix('LORAPLEX_').lower()}={env[k]}" for k in fields if k in env) or "-"
