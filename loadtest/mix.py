"""The locust load test's request mix: tenants, adapters with Zipf popularity, and request kinds.

Every knob is an env var, read once by `Mix.from_env()`, so `locust -f loadtest/locustfile.py`,
`loadtest/locust_setup.py` and `loadtest/sweep.py` agree without passing flags around:

    LOADTEST_TENANTS              8      tenants t00, t01, ...
    LOADTEST_ADAPTERS_PER_TENANT  4      adapters a0, a1, ... of each tenant
    LOADTEST_ZIPF_S               1.1    Zipf exponent of adapter popularity (0 = uniform)
    LOADTEST_BASE_SHARE           0.1    share of requests for the base model
    LOADTEST_STREAM_SHARE         0.5    share of streamed requests (SSE)
    LOADTEST_CHAT_SHARE           0.5    share of /v1/chat/completions (the rest: /v1/completions)
    LOADTEST_MAX_TOKENS           32     each request asks for max_tokens in [max/2, max], ignore_eos on
    LOADTEST_PROMPT_WORDS         8-64   prompt length range, in words
    LOADTEST_LORA_RANK            8      rank of the adapters the setup uploads (every other one: half)
    LOADTEST_SEED                 0      adapter popularity order, adapter weights, per-user choices
    LOADTEST_API_KEYS             -      `key:tenant,...` as LORAPLEX_API_KEYS; a tenant without a key sends none
    LOADTEST_ADMIN_KEY            -      bearer key for the setup's uploads (none: the server's dev mode)

No locust import here: the sweep and the tests use the mix without gevent's monkey-patching.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field

WORDS = (
    "the adapter serves many tenants while one base model stays frozen on the device and every request "
    "names its own low rank weights so the batch mixes them in a single forward pass river mountain "
    "invoice customer sentiment review summary translate question answer weather kitchen garden story "
    "report quarterly revenue support ticket refund shipping order status friendly staff slow delivery"
).split()
SYSTEM_PROMPT = "You are a concise assistant."


@dataclass(frozen=True)
class RequestSpec:
    """One request of the mix: what to send, as whom, and under which locust name it is reported."""

    model: str
    tenant: str
    is_chat: bool
    is_stream: bool
    max_tokens: int
    prompt: str

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.is_chat else "/v1/completions"

    @property
    def name(self) -> str:
        return ("chat" if self.is_chat else "completions") + (" stream" if self.is_stream else "")

    def body(self) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.7, "ignore_eos": True}
        if self.is_chat:
            body["messages"] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.is_stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body


@dataclass(frozen=True)
class Mix:
    num_tenants: int = 8
    adapters_per_tenant: int = 4
    zipf_s: float = 1.1
    base_share: float = 0.1
    stream_share: float = 0.5
    chat_share: float = 0.5
    max_tokens: int = 32
    prompt_words: tuple[int, int] = (8, 64)
    lora_rank: int = 8
    seed: int = 0
    api_keys: dict[str, str] = field(default_factory=dict)  # tenant -> bearer key
    admin_key: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Mix:
        env = os.environ if environ is None else environ
        get = lambda name, default: env.get(f"LOADTEST_{name}") or default  # noqa: E731
        low, _, high = get("PROMPT_WORDS", "8-64").partition("-")
        keys = {}
        for pair in filter(None, get("API_KEYS", "").split(",")):
            key, _, tenant = pair.strip().partition(":")
            keys[tenant] = key
        return cls(
            num_tenants=int(get("TENANTS", 8)), adapters_per_tenant=int(get("ADAPTERS_PER_TENANT", 4)),
            zipf_s=float(get("ZIPF_S", 1.1)), base_share=float(get("BASE_SHARE", 0.1)),
            stream_share=float(get("STREAM_SHARE", 0.5)), chat_share=float(get("CHAT_SHARE", 0.5)),
            max_tokens=int(get("MAX_TOKENS", 32)), prompt_words=(int(low), int(high or low)),
            lora_rank=int(get("LORA_RANK", 8)), seed=int(get("SEED", 0)), api_keys=keys,
            admin_key=get("ADMIN_KEY", None),
        )

    @property
    def tenants(self) -> list[str]:
        return [f"t{i:02d}" for i in range(self.num_tenants)]

    @property
    def adapter_ids(self) -> list[str]:
        """`<tenant>/<name>` in popularity order: rank 1 first. The order is a seeded shuffle, so the
        popular adapters spread over tenants instead of all belonging to t00."""
        ids = [f"{t}/a{j}" for t in self.tenants for j in range(self.adapters_per_tenant)]
        random.Random(self.seed).shuffle(ids)
        return ids

    def zipf_weights(self) -> list[float]:
        """P(rank k) proportional to 1 / k^s, normalized; s = 0 is uniform."""
        raw = [1.0 / (k ** self.zipf_s) for k in range(1, len(self.adapter_ids) + 1)]
        return [w / sum(raw) for w in raw]

    def headers(self, tenant: str | None) -> dict[str, str]:
        key = self.admin_key if tenant is None else self.api_keys.get(tenant)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def sampler(self, base_model: str, seed: int) -> RequestSampler:
        return RequestSampler(self, base_model, random.Random(seed))

    def describe(self) -> dict:
        out = asdict(self)
        out.pop("api_keys"), out.pop("admin_key")
        out["num_adapters"] = len(self.adapter_ids)
        out["top_adapter_share"] = self.zipf_weights()[0] * (1 - self.base_share)
        return out


class RequestSampler:
    """Draws requests of a mix from one random stream (one sampler per locust user)."""

    def __init__(self, mix: Mix, base_model: str, rng: random.Random):
        self.mix, self.base_model, self.rng = mix, base_model, rng
        self._ids, self._weights = mix.adapter_ids, mix.zipf_weights()

    def next(self) -> RequestSpec:
        mix, rng = self.mix, self.rng
        if rng.random() < mix.base_share:
            model = self.base_model
            tenant = rng.choice(mix.tenants)
        else:
            model = rng.choices(self._ids, weights=self._weights)[0]
            tenant = model.split("/", 1)[0]
        num_words = rng.randint(*mix.prompt_words)
        return RequestSpec(
            model=model, tenant=tenant, is_chat=rng.random() < mix.chat_share,
            is_stream=rng.random() < mix.stream_share,
            max_tokens=rng.randint(max(1, mix.max_tokens // 2), mix.max_tokens),
            prompt=" ".join(rng.choices(WORDS, k=num_words)),
        )
