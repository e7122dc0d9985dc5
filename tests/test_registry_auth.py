"""API keys -> principals, and who may use or manage an adapter. Pure functions: no server, no model."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from loraplex.registry import auth
from loraplex.registry.auth import (
    DEV_PRINCIPAL, Principal, authenticate, can_manage, can_use, load_api_keys, parse_api_keys, parse_api_keys_file,
    require_manage, require_use,
)
from loraplex.registry.errors import AdapterNotFound, Forbidden, Unauthorized

KEYS = {"sk-acme-0123456789": "acme", "sk-globex-9876543210": "globex"}
ADMIN_KEY = "sk-admin-secret"


@dataclass(frozen=True)
class Adapter:
    tenant: str
    shared: bool = False


ACME = Principal(tenant="acme", is_admin=False)
GLOBEX = Principal(tenant="globex", is_admin=False)
ADMIN = Principal(tenant=None, is_admin=True)


# --- key parsing -------------------------------------------------------------------------------------


def test_parse_api_keys():
    assert parse_api_keys("key1:acme,key2:globex") == {"key1": "acme", "key2": "globex"}
    assert parse_api_keys(" key1:acme , ,key:with:colons:globex ") == {"key1": "acme", "key:with:colons": "globex"}
    assert parse_api_keys("") == {}


@pytest.mark.parametrize("spec", ["secret-key", "secret-key:", ":acme", "secret-key:ACME", "secret-key:../x", "sec ret:acme",
                                  "secret-key:acme,secret-key:globex"])
def test_malformed_keys_are_refused_without_echoing_the_secret(spec):
    with pytest.raises(ValueError) as caught:
        parse_api_keys(spec)
    assert "secret" not in str(caught.value) and "entry" in str(caught.value)


def test_keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# tenant keys\nkey1:acme\n\n  key2:globex  \n")
    assert parse_api_keys_file(path) == {"key1": "acme", "key2": "globex"}
    assert load_api_keys("key3:initech", path) == {"key1": "acme", "key2": "globex", "key3": "initech"}
    assert load_api_keys("key1:acme", path)["key1"] == "acme"  # the same pair twice is fine
    with pytest.raises(ValueError, match="also configured"):
        load_api_keys("key1:initech", path)
    path.write_text("key1:acme\nbroken\n")
    with pytest.raises(ValueError, match="line 2"):
        parse_api_keys_file(path)


# --- authenticate ------------------------------------------------------------------------------------


def test_tenant_key_gives_its_tenant():
    assert authenticate("Bearer sk-acme-0123456789", KEYS, ADMIN_KEY) == ACME
    assert authenticate("bearer   sk-globex-9876543210 ", KEYS, ADMIN_KEY) == GLOBEX


def test_admin_key_gives_the_admin():
    assert authenticate(f"Bearer {ADMIN_KEY}", KEYS, ADMIN_KEY) == ADMIN
    assert authenticate(f"Bearer {ADMIN_KEY}", {}, ADMIN_KEY) == ADMIN  # an admin key alone turns auth on


@pytest.mark.parametrize("header", ["Bearer sk-acme-012345678", "Bearer sk-acme-0123456789x", "Bearer SK-ACME-0123456789",
                                    f"Bearer {ADMIN_KEY}-not"])
def test_wrong_key_is_unauthorized(header):
    with pytest.raises(Unauthorized, match="invalid API key") as caught:
        authenticate(header, KEYS, ADMIN_KEY)
    assert caught.value.status == 401


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_unauthorized(header):
    with pytest.raises(Unauthorized, match="missing"):
        authenticate(header, KEYS, ADMIN_KEY)


@pytest.mark.parametrize("header", ["sk-acme-0123456789", "Basic c2stYWNtZQ==", "Bearer", "Bearer ", "Token sk-acme-0123456789",
                                    "Bearer sk-acme 0123456789"])
def test_malformed_header_is_unauthorized(header):
    with pytest.raises(Unauthorized, match="malformed"):
        authenticate(header, KEYS, ADMIN_KEY)


def test_no_key_configured_is_single_tenant_dev_mode():
    for header in (None, "Bearer anything", "garbage"):
        assert authenticate(header, {}, None) == DEV_PRINCIPAL
    assert DEV_PRINCIPAL == Principal(tenant="default", is_admin=True, is_dev_mode=True)


def test_every_key_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(len(a) == len(b)) or real(a, b))
    authenticate("Bearer sk-acme-0123456789", KEYS, ADMIN_KEY)  # matches the first key: the scan goes on anyway
    assert compared == [True] * (1 + len(KEYS))  # admin + every tenant key, equal-length digests


# --- use / manage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("principal", "adapter", "usable", "manageable"), [
    (ACME, Adapter("acme"), True, True),
    (ACME, Adapter("globex"), False, False),
    (ACME, Adapter("globex", shared=True), True, False),
    (ADMIN, Adapter("globex"), True, True),
    (DEV_PRINCIPAL, Adapter("acme"), True, True),
])
def test_use_and_manage(principal, adapter, usable, manageable):
    assert (can_use(principal, adapter), can_manage(principal, adapter)) == (usable, manageable)


def test_foreign_private_adapter_reads_exactly_like_a_missing_one():
    with pytest.raises(AdapterNotFound) as foreign:
        require_use(ACME, Adapter("globex"), "globex/sql")
    assert str(foreign.value) == str(AdapterNotFound("globex/sql")) and foreign.value.status == 404
    with pytest.raises(AdapterNotFound):
        require_manage(ACME, Adapter("globex"), "globex/sql")  # not even a 403: that would confirm it exists


def test_shared_adapter_can_be_used_but_not_managed_by_others():
    require_use(ACME, Adapter("globex", shared=True), "globex/tool")
    with pytest.raises(Forbidden) as caught:
        require_manage(ACME, Adapter("globex", shared=True), "globex/tool")
    assert caught.value.status == 403
    require_manage(GLOBEX, Adapter("globex", shared=True), "globex/tool")
    require_manage(ADMIN, Adapter("globex"), "globex/sql")
