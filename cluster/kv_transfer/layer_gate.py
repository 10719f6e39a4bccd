"""``LayerGate``: one engine step's KV, layer by layer, as the model writes it.

A prefill step that finishes a request's prompt starts that request's KV transfer *before* the
step runs; the transfer reads layer ``l`` of the request's blocks once the gate says the step has
written it, while the model computes layer ``l + 1`` (layer-wise streaming)::

    model thread                         send thread (one per transfer)
    layer 0 attention writes kv[0] ─┐
    gate.layer_done(0) ─────────────┴──▶ gate.wait(0) returns: gather kv[0][:, blocks] -> wire
    layer 1 ...                          gate.wait(1) ...
    step raised: gate.fail(exc) ───────▶ gate.wait raises KVTransferError: the transfer aborts

One gate per step, shared by every transfer that step feeds. On CUDA ``layer_done`` records an
event on the current stream and ``wait`` synchronizes on it, so "written" means the kernels ran,
not merely that they were queued.
"""

from __future__ import annotations

import threading
import time

import torch

from .base import KVTransferError, KVTransferTimeout


class LayerGate:
    def __init__(self, num_layers: int, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self._cuda = torch.device(device).type == "cuda"
        self._events: list[torch.cuda.Event] = []
        self._num_done = 0  # layers 0 .. _num_done - 1 are written
        self._error: str | None = None
        self._cond = threading.Condition()

    # -- the model thread ------------------------------------------------------------------
    def layer_done(self, layer: int) -> None:
        """Layer ``layer`` of this step's KV is in the cache (called in layer order)."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        with self._cond:
            if event is not None:
                self._events.append(event)
            self._num_done = layer + 1
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """The step raised: transfers waiting for a layer it did not write fail now."""
        with self._cond:
            self._error = f"the prefill step failed: {type(exc).__name__}: {exc}"
            self._cond.notify_all()

    # -- send threads -------------------------------------------------------------------------
    @property
    def num_done(self) -> int:
        return self._num_done

    def wait(self, layer: int, timeout_s: float | None = None, transfer_id: str | None = None) -> None:
        """Return once ``layer`` is written; KVTransferError if the step failed first,
        KVTransferTimeout after ``timeout_s`` (None: no bound)."""
        if self._num_done > layer and not self._cuda:  # the common case after the first layers
            return
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._num_done <= layer:
                if self._error is not None:
                    raise KVTransferError(self._error, transfer_id=transfer_id)
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise KVTransferTimeout(f"layer {layer} of the prefill step not written in time",
                                            transfer_id=transfer_id)
                self._cond.wait(left)
            event = self._events[layer] if self._cuda else None
        if event is not None:
            event.synchronize()
