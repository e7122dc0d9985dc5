"""Weighted composition's refusals over HTTP: a component another tenant owns is the same 404 as a
missing one, byte for byte; every bad field of `adapters` / `merge` / `parameters.merged_adapters` is a
400 naming it (ranks the slot pool cannot hold included).
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from loraplex.api.app import create_app
from loraplex.models.demo import ensure_demo_model
from tests.adversarial import ADAPTER_ID_FORMS, assert_envelope, serve_in_thread, snapshot
from tests.composition_helpers import GEN, adapter_files
from tests.composition_helpers import tenant_settings, world  # noqa: F401
from tests.tenant_fixtures import auth, tenant_client, tenant_engine, upload  # noqa: F401
from tests.virtual_token_adapters import make_virtual_adapter

TWO = [{"id": "acme/tone", "weight": 0.7}, {"id": "acme/sql", "weight": 0.3}]


# Spellings (tests/adversarial.py): the resolution is the one `model` uses, which test_adversarial_tenants.py
# probes with all of them; these check that a composition neither adds nor loses a refusal.
SPELLINGS = ("tenant/name", "tenant/name@1", "tenant/name@2", "name", "@0", "%2F", "UPPER", "newline", "nul", "long id")


def _probes(component: str) -> dict[str, tuple[str, dict]]:
    adapters = [{"id": "globex/mine", "weight": 0.5}, {"id": component, "weight": 0.5}]
    chat = [{"role": "user", "content": "hi"}]
    merged = {"ids": ["globex/mine", component], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5}
    return {
        "completions": ("/v1/completions", {"prompt": "hi", "adapters": adapters, **GEN}),
        "completions stream": ("/v1/completions", {"prompt": "hi", "adapters": adapters, "stream": True, **GEN}),
        "chat": ("/v1/chat/completions", {"messages": chat, "adapters": adapters, "merge": {"method": "ties", "density": 0.5}, **GEN}),
        "chat stream": ("/v1/chat/completions", {"messages": chat, "adapters": adapters, "stream": True, **GEN}),
        "tgi generate": ("/generate", {"inputs": "hi", "parameters": {"merged_adapters": merged}}),
        "tgi stream": ("/generate_stream", {"inputs": "hi", "parameters": {"merged_adapters": merged}}),
    }


def test_a_foreign_component_is_the_same_404_as_a_missing_one(tenant_settings, tenant_engine, world):  # noqa: F811
    """globex composing its own adapter with acme's, for several spellings of the id: byte-identical answers
    (status, headers, body; the echoed id masked) for acme's adapter, one never made, one deleted."""
    with serve_in_thread(create_app(tenant_settings, tenant_engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for form_name in SPELLINGS:
            form = ADAPTER_ID_FORMS[form_name]
            candidates = {"foreign": form("acme", "secret"), "never existed": form("acme", "sekret"),
                          "deleted": form("acme", "erased"), "no such tenant": form("acne", "secret")}
            seen: dict[str, dict] = {}
            for label, component in candidates.items():
                for route, (path, body) in _probes(component).items():
                    response = c.post(path, headers=auth("globex"), json=body)
                    assert_envelope(response)
                    seen.setdefault(route, {})[label] = snapshot(response, component)
            for route, by_label in seen.items():
                assert len(set(by_label.values())) == 1, (form_name, route, by_label)
            if form_name == "tenant/name":
                assert seen["completions"]["foreign"].status == 404
                assert b'"param":"adapters.1.id"' in seen["completions"]["foreign"].body
                assert b'"param":"parameters.merged_adapters.ids.1"' in seen["tgi generate"]["foreign"].body
        mine = c.post("/v1/completions", headers=auth("acme"), json=_probes("acme/secret")["completions"][1])
        assert mine.status_code == 404  # acme cannot use globex's `mine` either
        own = {"prompt": "hi", "adapters": [{"id": "acme/secret"}, {"id": "acme/tone"}], **GEN}
        assert c.post("/v1/completions", headers=auth("acme"), json=own).status_code == 200


NINE = [{"id": f"acme/x{i}"} for i in range(9)]
BAD_OPENAI = [  # (body fields, the param named)
    ({"adapters": [{"id": "acme/tone", "weight": float("inf")}]}, "adapters.0.weight"),
    ({"adapters": [{"id": "acme/tone", "weight": 1e3}]}, "adapters.0.weight"),
    ({"adapters": [{"id": "acme/tone", "weight": "0.5"}]}, "adapters.0.weight"),
    ({"adapters": [{"id": "acme/tone", "wieght": 0.5}]}, "adapters.0.wieght"),
    ({"adapters": []}, "adapters"),
    ({"adapters": NINE}, "adapters"),
    ({"adapters": TWO, "merge": {"method": "svd"}}, "merge.method"),
    ({"adapters": TWO, "merge": {"method": "ties"}}, "merge.density"),
    ({"adapters": TWO, "merge": {"method": "ties", "density": 0}}, "merge.density"),
    ({"adapters": TWO, "merge": {"method": "dare_ties", "density": 1.5}}, "merge.density"),
    ({"adapters": TWO, "merge": {"method": "linear", "density": 0.5}}, "merge.density"),
    ({"adapters": TWO, "merge": {"method": "ties", "density": 0.5, "seed": 3}}, "merge.seed"),
    ({"adapters": TWO, "merge": {"method": "dare_linear", "density": 0.5, "majority_sign_method": "total"}},
     "merge.majority_sign_method"),
    ({"adapters": TWO, "merge": {"method": "ties", "density": 0.5, "majority_sign_method": "mean"}},
     "merge.majority_sign_method"),
    ({"model": "acme/tone", "adapters": TWO}, "model"),
    ({"model": "demo", "merge": {"method": "linear"}}, "merge"),
    ({}, "model"),
    ({"adapters": [{"id": "acme/tone"}, {"id": "acme/tone@1"}]}, "adapters.1.id"),
    ({"adapters": [{"id": "demo"}, {"id": "acme/tone"}]}, "adapters.0.id"),
    ({"adapters": [{"id": f"acme/{n}"} for n in ("tone", "sql", "mlp", "secret", "small")]}, "adapters"),  # rank 36 > 32
    ({"adapters": [{"id": "acme/tone"}, {"id": "acme/small"}], "merge": {"method": "ties", "density": 0.5}}, "adapters"),
]


@pytest.mark.parametrize("fields, param", BAD_OPENAI, ids=[p + str(i) for i, (_, p) in enumerate(BAD_OPENAI)])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_compositions_are_400s_naming_the_param(tenant_client, world, route, fields, param):  # noqa: F811
    base = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = _post_raw(tenant_client, route, {**base, **GEN, **fields})
    assert response.status_code == 400, response.text
    assert_envelope(response)
    assert response.json()["error"]["param"] == param, response.text


def _post_raw(client, route: str, body: dict):
    """JSON as Python writes it: NaN and Infinity included (json.loads on the server accepts them)."""
    headers = {**auth("acme"), "Content-Type": "application/json"}
    return client.post(route, headers=headers, content=json.dumps(body).encode())


BAD_TGI = [
    ({"adapter_id": "acme/tone", "merged_adapters": {"ids": ["acme/tone"]}}, "parameters.adapter_id"),
    ({"merged_adapters": {"ids": ["acme/tone", "acme/sql"], "weights": [1.0]}}, "parameters.merged_adapters.weights"),
    ({"merged_adapters": {"ids": ["acme/tone", "acme/sql"], "merge_strategy": "ties"}}, "parameters.merged_adapters.density"),
    ({"merged_adapters": {"ids": ["acme/tone", "acme/sql"], "merge_strategy": "dare_ties", "density": 0.0}},
     "parameters.merged_adapters.density"),
    ({"merged_adapters": {"ids": ["acme/tone"], "merge_strategy": "magnitude_prune"}}, "parameters.merged_adapters.merge_strategy"),
    ({"merged_adapters": {"ids": ["acme/tone"], "weights": [float("nan")]}}, "parameters.merged_adapters.weights.0"),
    ({"merged_adapters": {"ids": []}}, "parameters.merged_adapters.ids"),
    ({"merged_adapters": {"ids": ["acme/tone", "acme/sql"], "majority_sign_method": "total"}},
     "parameters.merged_adapters.majority_sign_method"),
    ({"merged_adapters": {"ids": [f"acme/{n}" for n in ("tone", "sql", "mlp", "secret", "small")]}}, "parameters.merged_adapters"),
]


@pytest.mark.parametrize("parameters, param", BAD_TGI, ids=[p + str(i) for i, (_, p) in enumerate(BAD_TGI)])
def test_bad_lorax_merged_adapters_are_400s_naming_the_param(tenant_client, world, parameters, param):  # noqa: F811
    response = _post_raw(tenant_client, "/generate", {"inputs": "hi", "parameters": parameters})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_only_lora_adapters_compose(tenant_settings, tenant_client, world, tmp_path):  # noqa: F811
    """A prompt-tuning adapter serves on its own but is no LoRA delta to add: 400 naming `adapters`."""
    model_dir = ensure_demo_model(Path(tenant_settings.data_dir))
    prompt = make_virtual_adapter(model_dir, tmp_path / "prompt", "PROMPT_TUNING", 4)
    assert upload(tenant_client, "acme", "prompt", adapter_files(prompt)).status_code == 201
    response = _post_raw(tenant_client, "/v1/completions", {"prompt": "hi", "adapters": [{"id": "acme/tone"}, {"id": "acme/prompt"}], **GEN})
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapters", response.text
    assert "adapter acme/prompt@1 cannot be composed" in response.json()["error"]["message"]
    alone = _post_raw(tenant_client, "/v1/completions", {"prompt": "hi", "model": "acme/prompt", **GEN})
    assert alone.status_code == 200, alone.text
