"""The inference engine: scheduler, KV cache, adapter slots, model runner, LoRA ops, sampler.

Imports nothing from FastAPI, Redis or pydantic; the API layer talks to it through
`AsyncEngine` and the plain dataclasses in `engine.types`.
"""
