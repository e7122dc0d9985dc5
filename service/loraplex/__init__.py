"""loraplex: one frozen base LLM, many per-tenant LoRA adapters, batched together."""

__version__ = "0.1.0"
