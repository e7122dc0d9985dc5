"""Weighted composition over HTTP: `adapters` + `merge` (OpenAI bodies), `parameters.merged_adapters`
(TGI/LoRAX body). A composition answers exactly what PEFT's `add_weighted_adapter` output answers when
uploaded as an adapter of its own, batches with plain requests, and a component's new version is never
served from a stale composition. Refusals (404s, 400s): tests/test_api_composition_errors.py.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loraplex.engine.composition import MergeSpec
from loraplex.models.demo import ensure_demo_model, make_demo_adapter
from tests.adversarial import serve_in_thread
from tests.composition_helpers import GEN, PROMPT, adapter_files, peft_weighted, save_weighted
from tests.composition_helpers import tenant_settings, world  # noqa: F401
from tests.tenant_fixtures import auth, tenant_client, tenant_engine, upload  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {  # name -> (components, weights, MergeSpec): what PEFT merges and saves
    "linear-2": (["tone", "sql"], [0.7, 0.3], MergeSpec()),
    "linear-3": (["tone", "sql", "small"], [1.5, -0.4, 0.9], MergeSpec()),
    "ties": (["tone", "sql", "mlp"], [0.8, 0.5, 0.6], MergeSpec("ties", density=0.4)),
    "dare_linear": (["tone", "mlp"], [0.9, 0.5], MergeSpec("dare_linear", density=0.5, seed=7)),
    "dare_ties": (["sql", "mlp"], [1.2, 0.8], MergeSpec("dare_ties", density=0.3, seed=0, majority_sign_method="frequency")),
}
TWO = [{"id": "acme/tone", "weight": 0.7}, {"id": "acme/sql", "weight": 0.3}]


@pytest.fixture(scope="module")
def peft_uploads(tenant_settings, tenant_client, world, tmp_path_factory):  # noqa: F811
    """PEFT's merge of each case, uploaded by acme as `peft-<case>`."""
    model_dir, root = ensure_demo_model(Path(tenant_settings.data_dir)), tmp_path_factory.mktemp("peft-merged")
    for case, (names, weights, merge) in CASES.items():
        merged = peft_weighted(model_dir, [world[n] for n in names], names, weights, merge)
        made = upload(tenant_client, "acme", f"peft-{case}", save_weighted(merged, root / case))
        assert made.status_code == 201, made.text


def _components(case: str) -> list[dict]:
    names, weights, _ = CASES[case]
    return [{"id": f"acme/{n}", "weight": w} for n, w in zip(names, weights)]


def _merge(case: str) -> dict:
    merge = CASES[case][2]
    fields = {"method": merge.method}
    if merge.method != "linear":
        fields |= {"density": merge.density}
    if merge.method.startswith("dare"):
        fields |= {"seed": merge.seed}
    if merge.method.endswith("ties"):
        fields |= {"majority_sign_method": merge.majority_sign_method}
    return fields


def _text(client, who: str, route: str = "/v1/completions", **body) -> str:
    if route == "/v1/completions":
        body = {"prompt": PROMPT, **GEN, **body}
    else:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], **GEN, **body}
    response = client.post(route, headers=auth(who), json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content"))


@pytest.mark.parametrize("case", CASES)
def test_a_composition_answers_what_peft_add_weighted_adapter_answers(tenant_client, peft_uploads, case):  # noqa: F811
    """linear == PEFT `cat`, ties / dare_* == PEFT's for the same density and seed: greedy text on both
    OpenAI routes equals that of PEFT's merged adapter uploaded as `acme/peft-<case>`, and so does TGI's
    (LoRAX's `merged_adapters`, whose dare masks are seed 0's)."""
    c = tenant_client
    for route in ("/v1/completions", "/v1/chat/completions"):
        reference = _text(c, "acme", route, model=f"acme/peft-{case}")
        assert _text(c, "acme", route, model="demo") != reference, "a no-op: the test would prove nothing"
        assert _text(c, "acme", route, adapters=_components(case), merge=_merge(case)) == reference, route
    names, weights, merge = CASES[case]
    if merge.seed != 0:
        return  # TGI's body has no seed: its dare masks are seed 0's
    merged = {"ids": [f"acme/{n}" for n in names], "weights": weights, "merge_strategy": merge.method,
              "density": merge.density or 0.0}  # LoRAX clients always send a density (0.0 by default)
    if merge.method.endswith("ties"):
        merged["majority_sign_method"] = merge.majority_sign_method
    tgi = c.post("/generate", headers=auth("acme"), json={"inputs": "Tell me", "parameters": {"merged_adapters": merged, "max_new_tokens": 8}})
    plain = c.post("/generate", headers=auth("acme"), json={"inputs": "Tell me", "parameters": {"adapter_id": f"acme/peft-{case}", "max_new_tokens": 8}})
    assert tgi.status_code == 200 and tgi.json() == plain.json(), tgi.text


def test_a_new_component_version_is_never_served_from_a_stale_composition(tenant_settings, tenant_client, world, tmp_path):  # noqa: F811
    c = tenant_client
    mix = [{"id": "acme/versioned", "weight": 0.6}, {"id": "acme/sql", "weight": 0.4}]
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    assert upload(c, "acme", "versioned", adapter_files(make_demo_adapter(model_dir, tmp_path / "v1", seed=31))).status_code == 201
    first = _text(c, "acme", adapters=mix)
    assert upload(c, "acme", "versioned", adapter_files(make_demo_adapter(model_dir, tmp_path / "v2", seed=32))).status_code == 201
    latest = _text(c, "acme", adapters=mix)
    pinned = [{"id": "acme/versioned@2", "weight": 0.6}, mix[1]]
    assert latest == _text(c, "acme", adapters=pinned) != first
    assert _text(c, "acme", adapters=[{"id": "acme/versioned@1", "weight": 0.6}, mix[1]]) == first


def test_compositions_batch_with_plain_and_base_requests(tenant_settings, tenant_engine, peft_uploads):  # noqa: F811
    """Sent at once, each answer equals the same request sent alone."""
    from loraplex.api.app import create_app

    bodies = [{"model": "demo"}, {"model": "acme/tone"}, {"adapters": TWO},
              {"adapters": _components("ties"), "merge": _merge("ties")}, {"model": "acme/peft-ties"}]
    with serve_in_thread(create_app(tenant_settings, tenant_engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
        alone = [_text(c, "acme", **body) for body in bodies]
        with ThreadPoolExecutor(len(bodies) * 2) as pool:
            together = list(pool.map(lambda body: _text(c, "acme", **body), bodies * 2))
    assert together == alone * 2
    assert alone[3] == alone[4] and len(set(alone[:4])) == 4
