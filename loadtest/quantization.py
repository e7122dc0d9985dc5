"""What quantizing the base costs: weight bytes, perplexity on a held-out story, decode tokens/s at batch 1 and 32,
for `none`, `int8` and `nf4` on the real model ../shared/models/stories260k, same run. One command:

    python loadtest/quantization.py [--device cuda] [--out DIR]

Weight bytes are the engine's resident weights (and the decoder projections alone). Perplexity is that of
transformers + bitsandbytes loaded with the same BitsAndBytesConfig: the quantized bytes are the engine's
(tests/test_engine_quantization.py), and fp32 compute (bf16 on CUDA). Decode: one engine per quantization,
`batch` base requests of 16 prompt tokens prefill (not timed), then the pure decode steps are timed; the
three engines alternate bursts, so all see the same load; medians of `--repeats`. Prints the setup.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from loraplex.engine.config import EngineConfig  # noqa: E402
from loraplex.engine.llm_engine import LLMEngine  # noqa: E402
from loraplex.engine.model_loader import load_model  # noqa: E402
from loraplex.engine.quantized_layers import projection_bytes, weight_bytes  # noqa: E402
from loraplex.engine.types import SamplingParams  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("LORAPLEX_SHARED_DIR") or REPO_ROOT.parent / "shared") / "models" / "stories260k"
METHODS = ("none", "int8", "nf4")
# Held out: written for this benchmark, in the style of the model's training stories (not taken from them).
HELD_OUT = (
    "Once upon a time, there was a little boy named Ben. Ben had a red ball that he loved very much. "
    "Every day he played with his ball in the big green park near his house. One day, Ben kicked the ball "
    "too hard and it went over the fence. Ben was sad. He did not know what to do. Then a kind girl named "
    "Mia came to help him. She climbed over the fence and found the ball under a tree. Ben was very happy. "
    "He said, \"Thank you, Mia!\" They played with the ball together until the sun went down. "
    "From that day on, Ben and Mia were best friends."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=STORIES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=3, help="bursts per (quantization, batch), alternating")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="write quantization.json here")
    return p.parse_args(argv)


def perplexity(model_dir: Path, method: str, dtype: torch.dtype, device: str, text: str) -> float:
    config = None
    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif method == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=config,
                                                 device_map={"": device} if config else None)
    model = model.to(device) if config is None else model
    for module in model.modules():  # bitsandbytes' bf16 CPU path: off, as in the engine (fp32 compute)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.float().item()
    return math.exp(loss)


def burst(engine: LLMEngine, batch: int, new_tokens: int, rng: random.Random) -> float:
    """Decode tokens/s of one burst of base requests (prefill steps excluded)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{i}-{rng.random()}", [1] + [rng.randrange(3, 500) for _ in range(15)], params, None)
    produced, elapsed = 0, 0.0
    while engine.unfinished_request_ids():
        decoding = engine.scheduler.num_running == batch and not engine.scheduler.num_waiting
        start = time.perf_counter()
        outputs = engine.step()
        if decoding and outputs:
            elapsed += time.perf_counter() - start
            produced += sum(len(o.new_token_ids) for _, o in outputs)
    return produced / elapsed if elapsed else 0.0


def setup(args, dtype: torch.dtype) -> dict:
    import bitsandbytes

    info = {"model": args.model.name, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    result = {"setup": setup(args, dtype), "rows": {}}
    print("setup:", json.dumps(result["setup"]), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engines, batches = {}, [int(b) for b in args.batches.split(",")]
    for method in METHODS:
        config = EngineConfig(model=str(args.model), device=args.device, dtype=str(dtype).removeprefix("torch."),
                              max_num_seqs=max(batches), max_model_len=128, quantization=method, compile="off")
        model = load_model(config.model, config.torch_dtype, config.torch_device, config.max_model_len, quantization=method)
        engines[method] = LLMEngine(config, model, tokenizer)
        result["rows"][method] = {"weight_bytes": weight_bytes(model), "projection_bytes": projection_bytes(model),
                                  "perplexity": perplexity(args.model, method, dtype, args.device, HELD_OUT)}
    rng, runs = random.Random(0), {(m, b): [] for m in METHODS for b in batches}
    for batch in batches:
        for method in METHODS:
            burst(engines[method], batch, 4, rng)  # warm-up
        for _ in range(args.repeats):
            for method in METHODS:
                runs[(method, batch)].append(burst(engines[method], batch, args.new_tokens, rng))
    for (method, batch), values in runs.items():
        result["rows"][method][f"decode_tok_s_batch{batch}"] = statistics.median(values)
    result["load_average_end"] = os.getloadavg()
    print(table(result), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantization.json").write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    base = rows["none"]
    lines = ["| quantization | weight bytes (all) | decoder projections | perplexity (held-out story) | decode tok/s, batch 1 | batch 32 |",
             "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        lines.append(
            f"| {method} | {r['weight_bytes'] / 1e6:.3f} MB | {r['projection_bytes'] / 1e6:.3f} MB "
            f"({r['projection_bytes'] / base['projection_bytes']:.2f}x) | {r['perplexity']:.3f} "
            f"({(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%) | {r.get('decode_tok_s_batch1', 0):.0f} | "
            f"{r.get('decode_tok_s_batch32', 0):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
