"""Eager vs compiled decode step (LORAPLEX_COMPILE), decode tokens/s at a few batch sizes. One command:

    python loadtest/compiled_decode.py                 # benchmark shape (576 hidden, 30 layers), batch 1 and 32
    python loadtest/compiled_decode.py --small         # hidden 256, 4 layers: quick

One engine, 16 adapters r=8 on q,v (requests cycle through them). The same engine runs each burst eagerly or
compiled (its runner's compiled step switched on or off), alternating, so both see the same load. A burst:
`batch` requests of `prompt_len` tokens prefill (not timed), then the pure decode steps until all finish are
timed. Prints medians, the compiled/eager ratio, the first (compiling) burst's time and the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from transformers import AutoTokenizer  # noqa: E402

from loadtest import workload  # noqa: E402
from loadtest.runtime import pick_runtime  # noqa: E402
from loraplex.engine.compiled_step import CompiledDecode  # noqa: E402
from loraplex.engine.config import EngineConfig  # noqa: E402
from loraplex.engine.llm_engine import LLMEngine  # noqa: E402
from loraplex.engine.model_loader import load_model  # noqa: E402
from loraplex.engine.types import LoraRequest, SamplingParams  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = workload.ModelShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a 4-layer model instead of the benchmark shape")
    p.add_argument("--batches", default="1,32", help="decode batch sizes")
    p.add_argument("--pairs", type=int, default=3, help="alternating (eager, compiled) bursts per batch size")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".data" / "bench")
    return p.parse_args(argv)


def burst(engine: LLMEngine, built, batch: int, args, rng: random.Random) -> tuple[float, float]:
    """Decode tokens per wall second and per CPU second of this process, over one burst's pure decode steps
    (CPU time is the steadier number on a shared machine: it does not count waiting for a core)."""
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        name = built.workload.adapter_for_request(i)
        adapter = LoraRequest(key=f"bench/{name}@1:{name}", path=str(built.adapter_dir(name)))
        engine.add_request(f"b{i}-{rng.random()}", [rng.randrange(3, 1000) for _ in range(args.prompt_len)], params, adapter)
    produced, elapsed, cpu, decoding = 0, 0.0, 0.0, False
    while engine.unfinished_request_ids():
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs = engine.step()
        if decoding and outputs:  # every sequence had its first token before this step: pure decode
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            produced += sum(len(o.new_token_ids) for _, o in outputs)
        elif not outputs:
            time.sleep(0.001)  # adapters still loading
        decoding = decoding or all(s.output_ids for s in engine._seqs.values())
    return (produced / elapsed, produced / cpu) if elapsed else (0.0, 0.0)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rt = pick_runtime(args.device)
    wl = workload.Workload(num_adapters=16)
    if args.small:
        wl = replace(wl, shape=SMALL)
    built = workload.build(wl, args.work_dir)
    config = EngineConfig(model=str(built.model_dir), device=rt.device.type, dtype=rt.dtype_name, max_loras=16,
                          max_lora_rank=8, max_model_len=256, compile="off")
    model = load_model(config.model, config.torch_dtype, config.torch_device, config.max_model_len)
    engine = LLMEngine(config, model, AutoTokenizer.from_pretrained(built.model_dir))
    compiled, rng = CompiledDecode(model, rt.device), random.Random(0)
    results = {"shape": wl.shape.tag, "device": str(rt.device), "load_average_start": os.getloadavg(), "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        engine.runner.compiled = compiled
        start = time.perf_counter()
        burst(engine, built, batch, args, rng)  # compiles this bucket (and warms the adapters)
        first_s = time.perf_counter() - start
        runs = {"eager": [], "compiled": []}
        for _ in range(args.pairs):
            for mode in ("eager", "compiled"):
                engine.runner.compiled = compiled if mode == "compiled" else None
                runs[mode].append(burst(engine, built, batch, args, rng))
        wall = {m: statistics.median(r[0] for r in runs[m]) for m in runs}
        per_cpu = {m: statistics.median(r[1] for r in runs[m]) for m in runs}
        results["batches"][batch] = {"wall_tok_s": wall, "cpu_tok_s": per_cpu, "wall_ratio": wall["compiled"] / wall["eager"],
                                     "cpu_ratio": per_cpu["compiled"] / per_cpu["eager"], "first_compiled_burst_s": first_s,
                                     "runs": runs, "load_average": os.getloadavg()}
        print(f"batch {batch}: tok/s eager {wall['eager']:.1f} compiled {wall['compiled']:.1f} (ratio "
              f"{wall['compiled'] / wall['eager']:.2f}); per CPU-s eager {per_cpu['eager']:.1f} compiled "
              f"{per_cpu['compiled']:.1f} (ratio {per_cpu['compiled'] / per_cpu['eager']:.2f}); first compiled burst "
              f"{first_s:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
