"""PEFT `add_weighted_adapter` references for the composition tests, and the HTTP tests' tenants:
acme owns the components (and deleted `erased`), globex owns `mine`.

PEFT draws dare masks from torch's global RNG after creating the new adapter's layers (whose init draws
too); "the same seed" means torch's RNG holds `seed` when PEFT's merge loop starts, so the reference
seeds it right there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.config import Settings
from loraplex.engine.composition import MergeSpec
from loraplex.models.demo import ensure_demo_model, make_demo_adapter
from tests.tenant_fixtures import KEYS, auth, upload

PROMPT = [0, 17, 261, 93, 402, 12]
GEN = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # acme's
    "tone": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=11),
    "sql": dict(r=8, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=12),
    "mlp": dict(r=8, alpha=24, target_modules=("q_proj", "up_proj", "down_proj"), seed=13),
    "small": dict(r=4, alpha=8, target_modules=ALL, seed=14),
    "secret": dict(r=8, alpha=16, seed=15),
    "erased": dict(r=8, alpha=16, seed=16),
}
PEFT_COMBINATION = {"linear": "cat", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties"}


def peft_weighted(model_dir: Path, adapter_dirs: list[Path], names: list[str], weights: list[float], merge: MergeSpec):
    """The base model + PEFT with the components loaded (as `names`) and merged into adapter `mix` (active)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(path, adapter_name=name)
    lora_model, inject = model.base_model, model.base_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(merge.seed)

    lora_model.inject_adapter = inject_then_seed
    lora_model.add_weighted_adapter(names, weights, "mix", combination_type=PEFT_COMBINATION[merge.method],
                                    density=merge.density, majority_sign_method=merge.majority_sign_method)
    model.set_adapter("mix")
    return model.eval()


def save_weighted(model, out_dir: Path) -> dict[str, bytes]:
    """The merged adapter `mix` as PEFT saves it: the two files an upload sends."""
    model.save_pretrained(out_dir, selected_adapters=["mix"])
    saved = out_dir / "mix"
    return {name: (saved / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def tenant_settings(tmp_path_factory) -> Settings:
    """tenant_fixtures' app with room for compositions: rank sums up to 32, three slots."""
    return Settings(
        model="demo", data_dir=tmp_path_factory.mktemp("compose-data"), device="cpu", dtype="float32",
        max_model_len=256, max_num_seqs=8, max_loras=3, max_lora_rank=32, max_adapter_bytes=2_000_000,
        api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"], log_level="warning",
    )


def adapter_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def world(tenant_settings, tenant_client, tmp_path_factory) -> dict[str, Path]:
    """acme's adapters uploaded (`erased` then deleted), globex's `mine`; -> acme's adapter dirs."""
    c, model_dir = tenant_client, ensure_demo_model(Path(tenant_settings.data_dir))
    root = tmp_path_factory.mktemp("compose-adapters")
    dirs = {name: make_demo_adapter(model_dir, root / name, **kwargs) for name, kwargs in ADAPTERS.items()}
    for name, path in dirs.items():
        assert upload(c, "acme", name, adapter_files(path)).status_code == 201
    assert c.delete("/v1/adapters/acme/erased", headers=auth("acme")).status_code == 200
    mine = make_demo_adapter(model_dir, root / "mine", r=8, alpha=16, seed=21)
    assert upload(c, "globex", "mine", adapter_files(mine)).status_code == 201
    return dirs
