"""KV-cache transfer from prefill to decode workers. Protocol and contracts: base.py.

Only the transport-neutral API is imported here; transports load when chosen by name.
"""

from .base import (
    KV_DTYPES,
    KV_TRANSPORTS,
    KVReceiver,
    KVSender,
    KVSendResult,
    KVTicket,
    KVTransferError,
    KVTransferMeta,
    KVTransferState,
    KVTransferStats,
    KVTransferTimeout,
    make_kv_receiver,
    make_kv_sender,
    run_kv_transfer,
)
from .layer_gate import LayerGate
from .layout import block_index, gather_kv_layer, iter_kv_layers, scatter_kv_layer

__all__ = [
    "KV_DTYPES",
    "KV_TRANSPORTS",
    "KVReceiver",
    "KVSendResult",
    "KVSender",
    "KVTicket",
    "KVTransferError",
    "KVTransferMeta",
    "KVTransferState",
    "KVTransferStats",
    "KVTransferTimeout",
    "LayerGate",
    "block_index",
    "gather_kv_layer",
    "iter_kv_layers",
    "make_kv_receiver",
    "make_kv_sender",
    "run_kv_transfer",
    "scatter_kv_layer",
]
