"""Models built locally: the offline demo Llama and demo LoRA adapters (tests, `make run`, benchmarks)."""
from loraplex.models.demo import ensure_demo_model, ensure_example_adapter, make_demo_adapter

__all__ = ["ensure_demo_model", "ensure_example_adapter", "make_demo_adapter"]
