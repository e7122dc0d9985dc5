"""Translation between the wire formats and the engine: prompts in, RequestOutput deltas out."""
