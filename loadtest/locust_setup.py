"""Setup for the locust load test: the mix's adapters exist on the server, uploaded through the HTTP API.

    python loadtest/locust_setup.py --host http://127.0.0.1:8000     # what locustfile.py's test_start does

Every adapter `<tenant>/a<j>` of the mix (see mix.py) is uploaded as the admin (`LOADTEST_ADMIN_KEY`,
or no key against a dev-mode server) with the multipart `tenant` field, unless the server already has
it: running the setup twice uploads nothing new. The adapter files are PEFT LoRAs with random A and B
made by `loraplex.models.demo.make_demo_adapter` for the server's model (its `config.json` is all
they need: `LOADTEST_MODEL_DIR`, default the demo model) and cached under the work dir. Adapters vary
a little, as real ones do: every other one has half the rank and targets q,k,v,o instead of q,v.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `loadtest` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("loraplex") is None:  # not installed: use the checkout's
    sys.path.append(str(Path(__file__).resolve().parents[1] / "service"))

from loadtest.mix import Mix  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = Path(os.environ.get("LOADTEST_WORK_DIR") or REPO_ROOT / ".data" / "locust")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def ensure_adapters(host: str, mix: Mix, model_dir: Path | None = None, work_dir: Path = DEFAULT_WORK_DIR,
                    log=print) -> int:
    """Upload the mix's adapters the server lacks; returns how many were uploaded."""
    model_dir = Path(model_dir or os.environ.get("LOADTEST_MODEL_DIR") or demo_model_dir(work_dir))
    num_uploaded = 0
    with httpx.Client(base_url=host, headers=mix.headers(None), timeout=120) as client:
        missing = [a for a in mix.adapter_ids if client.get(f"/v1/adapters/{a}").status_code != 200]
        for adapter_id, files_dir in build_adapter_files(model_dir, work_dir, mix, missing).items():
            tenant, name = adapter_id.split("/")
            files = [("files", (f, (files_dir / f).read_bytes())) for f in ADAPTER_FILES]
            response = client.post("/v1/adapters", data={"name": name, "tenant": tenant}, files=files)
            if response.status_code != 201:
                raise RuntimeError(f"upload of {adapter_id} failed: {response.status_code} {response.text[:500]}")
            num_uploaded += 1
    log(f"setup: {num_uploaded} adapters uploaded, {len(mix.adapter_ids) - num_uploaded} already there")
    return num_uploaded


def build_adapter_files(model_dir: Path, work_dir: Path, mix: Mix, adapter_ids: list[str] | None = None) -> dict[str, Path]:
    """adapter id -> directory with its two files, built once per model config and adapter fields."""
    ordered = sorted(mix.adapter_ids)  # the index (weights seed, rank, targets) does not depend on popularity
    return {a: _adapter_files(model_dir, work_dir, mix, ordered.index(a)) for a in (ordered if adapter_ids is None else adapter_ids)}


def base_model(host: str, mix: Mix) -> str:
    """The base model's name, as the server lists it (the one card without a parent)."""
    tenant = mix.tenants[0] if mix.api_keys else None
    response = httpx.get(f"{host}/v1/models", headers=mix.headers(tenant), timeout=30)
    response.raise_for_status()
    return next(card["id"] for card in response.json()["data"] if not card.get("parent"))


def _adapter_files(model_dir: Path, work_dir: Path, mix: Mix, index: int) -> Path:
    """Even indexes: rank r on q,v; odd: rank r/2 on q,k,v,o. Cached under the model's config hash."""
    rank = mix.lora_rank if index % 2 == 0 else max(1, mix.lora_rank // 2)
    targets = ("q_proj", "v_proj") if index % 2 == 0 else ("q_proj", "k_proj", "v_proj", "o_proj")
    seed = mix.seed * 10_000 + index + 1
    model_key = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]
    out_dir = work_dir / "adapter-files" / model_key / f"r{rank}-{'-'.join(t[0] for t in targets)}-s{seed}"
    if not all((out_dir / f).exists() for f in ADAPTER_FILES):
        from loraplex.models.demo import make_demo_adapter  # torch and peft: only when a file is missing

        make_demo_adapter(model_dir, out_dir, r=rank, alpha=2 * rank, target_modules=targets, seed=seed)
    return out_dir


def demo_model_dir(work_dir: Path) -> Path:
    from loraplex.models.demo import ensure_demo_model

    return ensure_demo_model(work_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Upload the locust mix's adapters (env LOADTEST_*, see mix.py).")
    parser.add_argument("--host", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model-dir", type=Path, help="the server's model directory (default: the demo model)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="cache of built adapter files")
    args = parser.parse_args(argv)
    ensure_adapters(args.host, Mix.from_env(), args.model_dir, args.work_dir)


if __name__ == "__main__":
    main()
