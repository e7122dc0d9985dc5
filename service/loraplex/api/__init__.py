"""HTTP layer: routes (thin) -> serving (wire format <-> engine) -> engine. `create_app` builds it."""
from loraplex.api.app import create_app

__all__ = ["create_app"]
