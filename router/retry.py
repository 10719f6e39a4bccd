"""``RetryPolicy``: what a worker failure means for a request: retry the stage, migrate, or fail.

Which stage failed decides (``_failed_stage``): the encoder (its result is an error) is retried on
another encoder; prefill before its first token on another prefill worker; anything later (the
KV transfer, decode: tokens were streamed) *migrates*: another decode worker, a re-prefill of
prompt + the tokens sent so far. Each kind has its own budget (``router.max_*_retries``,
``router.max_decode_migrations``); the failed worker is avoided by the request from then on.
"""

from __future__ import annotations

import logging

from cluster.config import ClusterConfig
from cluster.controller import PoolWorker
from router.metrics import RouterMetrics
from router.request_stream import RequestState
from router.stages import StageRunner
from router.worker_calls import WorkerCalls

log = logging.getLogger(__name__)


class RetryPolicy:
    def __init__(self, config: ClusterConfig, calls: WorkerCalls, metrics: RouterMetrics, stages: StageRunner):
        self.config, self.calls, self.metrics, self.stages = config, calls, metrics, stages

    async def retry(self, st: RequestState, t: dict, exc: BaseException, tokens: list[int]) -> None:
        """A worker failed the request. Which stage failed decides what happens; ``exc`` (as the
        client's error) is raised when that stage has no retry left:

        * the encoder (its result is an error): encode once more, on another encoder;
        * prefill, before its first token: prefill again, on another prefill worker;
        * later (KV transfer, decode; tokens were streamed): migrate, i.e. reserve on another
          decode worker and re-prefill prompt + the tokens sent so far, which continues greedy
          output exactly where it stopped.
        Whatever the failed attempt held is let go first (its reservation, a KV transfer)."""
        if st.prefill_gen is None and not st.prefill_has_token:  # no decode worker could reserve (all tried)
            raise self.calls.failure(exc)
        stage, worker, error = await self._failed_stage(st, exc)
        cfg = self.config.router
        allowed = {"encoder": cfg.max_encoder_retries, "prefill": cfg.max_prefill_retries,
                   "decode": cfg.max_decode_migrations}[stage]
        done = st.num_retries.get(stage, 0)
        if done >= allowed:
            raise error
        st.num_retries[stage] = done + 1
        if worker is not None:
            st.avoid.add(worker.worker_id)
        log.warning("request %s: %s worker %s failed (%s); %s", st.request_id, stage,
                    worker.worker_id if worker else "?", error,
                    "migrating" if stage == "decode" else f"retrying on another {stage} worker")
        self.metrics.observe_retry(stage)
        await self.stages.release_attempt(st)
        if stage == "encoder":
            self.stages.accounting.unaccount(st, "encoder")
            self.stages.encode(st, t)

    async def _failed_stage(self, st: RequestState, exc: BaseException) -> tuple[str, PoolWorker | None, Exception]:
        """(stage, worker, client error) of a failed attempt."""
        if not st.prefill_has_token and st.encode_ref is not None:
            try:
                await st.encode_ref  # (only on this failure path: fetches the embeddings once)
            except Exception as enc_exc:  # noqa: BLE001 - the encoder failed the request
                return "encoder", st.encoder_worker, self.calls.failure(enc_exc, st.encoder_worker)
        if not st.prefill_has_token:
            return "prefill", st.prefill_worker, self.calls.failure(exc, st.prefill_worker)
        worker = st.decode_worker if st.prefill_drained else None  # a failed transfer: either side
        return "decode", worker, self.calls.failure(exc, worker)
