"""Fault injection: named points inside the workers where a test or a chaos drill makes the next
passes fail, stall or kill the process, to prove that the rest of the cluster copes.

Points (where ``FaultInjector.hit`` is called)::

    encode     encoder worker, model thread, before a batch is decoded and encoded
    forward    prefill / decode / colocated worker, model thread, before a model step
    kv_send    prefill worker, send thread, before each layer of a KV transfer is sent
    kv_receive decode worker, before a KV transfer is received

Actions: ``raise`` (an ``InjectedFault`` where a real bug or device error would surface),
``stall`` (sleep ``seconds``: a hung peer or device), ``exit`` (``os._exit``: the process dies
as it would on a segfault, OOM kill or lost node).

Off unless the worker process runs with ``TESSERA_FAULT_INJECTION=1`` in its environment: the
operator sets it on the Ray cluster (the tests do, for their local instance); no client request
can turn it on. ``BaseWorker.inject_fault`` arms a point.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV_VAR = "TESSERA_FAULT_INJECTION"
POINTS = ("encode", "forward", "kv_send", "kv_receive")
ACTIONS = ("raise", "stall", "exit")


class InjectedFault(RuntimeError):
    """Raised at an armed point with action ``raise``."""


def fault_injection_enabled() -> bool:
    return os.environ.get(ENV_VAR, "") == "1"


@dataclass
class _Armed:
    action: str
    remaining: int  # passes left that trigger
    seconds: float  # stall length
    skip: int  # passes to let through first


class FaultInjector:
    """The armed points of one worker. ``hit`` costs one dict lookup when nothing is armed."""

    def __init__(self, owner: str):
        self.owner = owner
        self.enabled = fault_injection_enabled()
        self._armed: dict[str, _Armed] = {}
        self._lock = threading.Lock()  # hit() runs in model/send threads, arm() on the event loop
        self.num_triggered = 0

    def arm(self, point: str, action: str = "raise", *, count: int = 1, seconds: float = 0.0, skip: int = 0) -> None:
        if not self.enabled:
            raise PermissionError(f"fault injection is off in {self.owner}: start the Ray cluster with {ENV_VAR}=1")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"unknown fault {point!r}/{action!r}: points {POINTS}, actions {ACTIONS}")
        if count < 1 or skip < 0 or seconds < 0:
            raise ValueError("count must be >= 1, skip and seconds >= 0")
        with self._lock:
            self._armed[point] = _Armed(action, count, seconds, skip)

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def hit(self, point: str) -> None:
        if not self._armed:
            return
        with self._lock:
            armed = self._armed.get(point)
            if armed is None:
                return
            if armed.skip:
                armed.skip -= 1
                return
            armed.remaining -= 1
            if armed.remaining <= 0:
                del self._armed[point]
            self.num_triggered += 1
        logger.warning("%s: injected fault at %s: %s", self.owner, point, armed.action)
        if armed.action == "raise":
            raise InjectedFault(f"injected fault at {point} in {self.owner}")
        if armed.action == "stall":
            time.sleep(armed.seconds)
        elif armed.action == "exit":
            os._exit(1)
