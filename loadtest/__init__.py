"""loraplex benchmark: `python loadtest/bench.py` (see loadtest/README.md)."""
