"""KV transports behind one interface: Ray's object store, and point to point through
torch.distributed (NCCL between GPUs, gloo on CPU)."""

from pdserve.cluster.kv_transport.base import KVTransport, TransferStats
from pdserve.cluster.kv_transport.object_store import ObjectStoreTransport
from pdserve.cluster.kv_transport.p2p import P2PTransport

TRANSPORTS = {"object_store": ObjectStoreTransport, "nccl": P2PTransport}


def make_transport(name: str) -> KVTransport:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; available: {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]()


__all__ = ["KVTransport", "ObjectStoreTransport", "P2PTransport", "TransferStats", "make_transport"]
