"""KV transports behind one interface: the object store now, NCCL on GPUs."""

from cluster.kv_transport.base import KVTransport, TransferStats
from cluster.kv_transport.object_store import ObjectStoreTransport


def make_transport(name: str) -> KVTransport:
    if name == "object_store":
        return ObjectStoreTransport()
    raise ValueError(f"unknown KV transport {name!r}; available: object_store")


__all__ = ["KVTransport", "ObjectStoreTransport", "TransferStats", "make_transport"]
