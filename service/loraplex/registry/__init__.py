"""Where adapters live and whether they can be served: `LocalAdapterStore` over `<data_dir>/<tenant>/<name>/`."""
from loraplex.registry.adapter_config import InvalidAdapter, LoraSpec, RegistryError
from loraplex.registry.local_store import AdapterNotFound, AdapterRecord, LocalAdapterStore, parse_adapter_id

__all__ = [
    "AdapterNotFound",
    "AdapterRecord",
    "InvalidAdapter",
    "LocalAdapterStore",
    "LoraSpec",
    "RegistryError",
    "parse_adapter_id",
]
