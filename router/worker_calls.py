"""Calls from the router into worker actors, and what their failures mean to a request.

Every Ray error a worker call raises becomes one of the router's own errors here
(``router.events``): an actor that died is marked dead in the controller and is
``WorkerUnavailableError`` (the request retries or migrates); a request the worker refused is
``InvalidRequestError``; anything else is ``WorkerUnavailableError`` with a short reason.
"""

from __future__ import annotations

import contextlib

import ray
from ray.exceptions import RayActorError, RayError

from cluster.controller import Controller, PoolWorker
from cluster.request_types import InvalidRequestError
from router.events import RouterError, WorkerUnavailableError


class WorkerCalls:
    def __init__(self, controller: Controller):
        self.controller = controller

    async def call(self, worker: PoolWorker, ref):
        """Await ``ref`` (a call to ``worker``), its failure translated."""
        try:
            return await ref
        except (RouterError, InvalidRequestError):
            raise
        except Exception as exc:  # (CancelledError is a BaseException: it passes through)
            raise self.failure(exc, worker) from exc

    @staticmethod
    async def next(gen, expected: type, stage: str):
        """The next item of a worker's streaming generator, which must be an ``expected``."""
        try:
            ref = await gen.__anext__()
        except StopAsyncIteration:
            raise WorkerUnavailableError(f"the {stage} worker ended the stream early") from None
        item = await ref
        if not isinstance(item, expected):
            raise WorkerUnavailableError(f"the {stage} worker sent {type(item).__name__}, expected {expected.__name__}")
        return item

    def failure(self, exc: BaseException, worker: PoolWorker | None = None) -> Exception:
        """The router error ``exc`` (raised by a call to ``worker``, if known) stands for."""
        if isinstance(exc, (RouterError, InvalidRequestError)):
            return exc
        if isinstance(exc, RayActorError):
            if worker is None:
                worker = self._worker_of(exc)
            if worker is not None:
                self.controller.mark_dead(worker.worker_id, str(exc).splitlines()[0] if str(exc) else "actor died")
            return WorkerUnavailableError(f"a worker failed: {type(exc).__name__}")
        if isinstance(exc, RayError):
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, InvalidRequestError):
                return InvalidRequestError(str(cause))
            return WorkerUnavailableError(f"a worker failed: {short(cause)}")
        return WorkerUnavailableError(f"internal error: {short(exc)}")

    def _worker_of(self, exc: RayActorError) -> PoolWorker | None:
        actor_id = getattr(exc, "actor_id", None)
        if not actor_id:
            return None
        for w in self.controller.workers():
            with contextlib.suppress(Exception):
                if w.actor._actor_id.hex() == actor_id:
                    return w
        return None


def cancel(ref_or_gen) -> None:
    # recursive=False: a prefill worker's KV-shipping calls to the decode worker run as children
    # of its prefill task; cancelling them would strand the decode reservation mid-handshake.
    with contextlib.suppress(Exception):
        ray.cancel(ref_or_gen, recursive=False)


async def as_coro(ref):
    return await ref


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]
