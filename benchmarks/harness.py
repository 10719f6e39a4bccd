"""What every comparison shares: run sizes (``Settings``), the servers it starts and the runs it
measures (``Suite``), and the shape of its result (``comparison``, read by ``benchmarks.report``).

``Suite.measure`` is one bounded load run against a server, with the server's own ``/metrics``
histograms scraped before and after it, so client figures always come with the server's for the
same interval; ``distortion_notes`` says when the client's cannot be trusted.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PEER_DIR = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-cpu"
VLLM_VENV = Path.home() / ".cache" / "tessera" / "bench" / "vllm-cpu-venv"
IMAGE_ARCH, AUDIO_ARCH = "llava-clip-llama", "qwen2-audio"
GOODPUT_SERVERS = {"disaggregated": "disaggregated", "colocated": "colocated", "vLLM CPU": "vllm"}


@dataclass
class Settings:
    """Sizes of the runs. ``quick``: a few requests each (smoke test); the default is the recorded run."""

    seed: int = 0
    slo_ttft_ms: float | None = None  # None: calibrated (slo_scale x unloaded p50 of the baseline)
    slo_tpot_ms: float | None = None
    slo_scale: float = 5.0
    protocol: str = "grpc"  # Tessera-only comparisons; goodput always uses HTTP (the peer speaks only that)
    max_run_s: float = 180.0  # time limit of one run
    warmup_requests: int = 4
    # isolation
    text_concurrency: int = 4
    text_requests: int = 64  # p99 of 32 streams is their maximum; 64 gives the p99 a neighbour
    vl_rate: float = 1.0  # multi-image requests/s behind the text streams
    vl_lead_s: float = 3.0  # the multi-image load runs this long before the text streams start
    # goodput
    goodput_servers: tuple[str, ...] = ("disaggregated", "colocated", "vllm")
    goodput_start_rate: float = 0.5
    goodput_max_probes: int = 7
    probe_seconds: float = 40.0  # requests per probe = rate x this, within [probe_min, probe_max]
    probe_min: int = 16
    probe_max: int = 200
    # kv transfer
    kv_blocks: tuple[int, ...] = (1, 4, 16, 32, 64, 128, 256)  # x 256 KiB
    kv_repeats: int = 5
    kv_lanes: int = 4  # head-of-line: lanes per pair (kv_transfer.lanes_per_pair), against 1
    kv_hol_blocks: int = 256  # the long transfer: 64 MiB, a 16k-token prompt of the tiny LLaVA
    # encoder cache
    cache_pairs: int = 12
    # kv streaming
    stream_rounds: int = 8  # sequential 8-image requests per server
    # scaling
    scaling_images: tuple[int, ...] = (0, 1, 2, 4, 6, 8)
    scaling_repeats: int = 4
    decode_workers: tuple[int, ...] = ()  # () : 1 .. (cores - 1)
    throughput_concurrency: int = 16
    throughput_requests: int = 64

    @classmethod
    def quick(cls, **kw) -> "Settings":
        return cls(**{**dict(max_run_s=60.0, warmup_requests=1, text_concurrency=2, text_requests=4, vl_rate=1.0,
                             vl_lead_s=1.0, goodput_start_rate=0.5, goodput_max_probes=2, probe_seconds=4.0,
                             probe_min=3, probe_max=6, kv_blocks=(1, 16, 32), kv_repeats=2, kv_hol_blocks=32,
                             cache_pairs=2,
                             scaling_images=(0, 1, 2), scaling_repeats=1, stream_rounds=2, throughput_concurrency=4,
                             throughput_requests=6), **kw})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def slo(self):
        from benchmarks.metrics import SLO

        if self.slo_ttft_ms is None or self.slo_tpot_ms is None:
            return None
        return SLO(self.slo_ttft_ms / 1e3, self.slo_tpot_ms / 1e3)


@dataclass
class Suite:
    settings: Settings
    layout: Any  # CoreLayout
    out_dir: Path
    progress: bool = True
    vllm_venv: Path = VLLM_VENV
    peer_dir: Path = PEER_DIR
    vllm_args: list[str] = field(default_factory=list)
    placement: list[dict[str, Any]] = field(default_factory=list)
    _models: dict[str, str] = field(default_factory=dict)
    _servers: list[Any] = field(default_factory=list)  # started and not yet stopped

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    @property
    def models(self) -> dict[str, str]:
        """{arch: model folder} of what the comparisons served."""
        return dict(self._models)

    def model(self, arch: str) -> str:
        """The tiny checkpoint of ``arch``, in the key layout both Tessera and vLLM load (one folder
        for every server of a comparison)."""
        if arch not in self._models:
            from benchmarks.peer_model import hub_layout_model
            from models.tiny import ensure_tiny_model

            self._models[arch] = str(hub_layout_model(ensure_tiny_model(arch)))
        return self._models[arch]

    # -- servers --------------------------------------------------------------------------------------
    async def start_tessera(self, mode: str, arch: str = IMAGE_ARCH, *, num_decode: int = 1, tag: str = "",
                            kv_transfer: dict[str, Any] | None = None):
        from benchmarks.servers import TesseraServer, tessera_config

        roles = {k: v for k, v in self.layout.to_dict().items() if isinstance(v, list) and k != "notes"}
        config = tessera_config(mode, self.model(arch), roles, num_decode=num_decode, kv_transfer=kv_transfer)
        name = f"tessera-{mode}{tag}"
        return await self._launch(TesseraServer(name, mode, config, roles, self.log_dir))

    async def start_vllm(self, arch: str = IMAGE_ARCH):
        from benchmarks.servers import VllmServer, ensure_vllm

        await asyncio.to_thread(ensure_vllm, self.vllm_venv, self.peer_dir, self.log_dir / "vllm-install.log")
        args = ["--dtype", "float32", "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 8}',
                *self.vllm_args]
        return await self._launch(VllmServer("vllm-cpu", self.vllm_venv, self.peer_dir, self.model(arch),
                                             cores=self.layout.vllm, compute_cores=self.layout.vllm_compute,
                                             log_dir=self.log_dir, extra_args=args))

    async def _launch(self, server):
        self._servers.append(server)  # before start: an interrupted start is stopped too (stop_all)
        try:
            await asyncio.to_thread(server.start)
        except BaseException:
            self._servers.remove(server)
            await asyncio.to_thread(server.stop)
            raise
        self._record_placement(server)
        return server

    def _record_placement(self, server) -> None:
        """Observed masks; one row per (process, cores) even when a server is started again."""
        try:
            rows = server.placement()
        except OSError:
            return
        seen = {(p["process"], p["cores"]) for p in self.placement}
        self.placement += [p for p in rows if (p["process"], p["cores"]) not in seen]

    async def serve_each(self, comp: dict[str, Any], starters):
        """For each ``(name, start)``: start the server, yield ``(name, server)``, stop it once the
        loop body is done. One that cannot start is noted in ``comp`` and skipped. Iterate inside
        ``contextlib.aclosing`` so a body that raises still stops its server."""
        from benchmarks.servers import ServerUnavailable

        for name, start in starters:
            try:
                server = await start()
            except ServerUnavailable as exc:
                note_skipped(comp, f"{name}: {exc}")
                continue
            try:
                yield name, server
            finally:
                await self.stop(server)

    async def stop(self, server) -> None:
        if server in self._servers:
            self._servers.remove(server)
        await asyncio.to_thread(server.stop)

    def stop_all(self) -> None:
        """Stop every server still running (after an interrupt); blocking."""
        while self._servers:
            self._servers.pop().stop()

    def client(self, server, protocol: str | None = None):
        from benchmarks.clients import OpenAIChatClient, TesseraGrpcClient

        protocol = protocol or self.settings.protocol
        tls = getattr(server, "tls", None)  # a remote server's (tessera bench run/sweep --tls-ca ...)
        if protocol == "grpc" and server.grpc_address:
            return TesseraGrpcClient(server.grpc_address, tls=tls)
        return OpenAIChatClient(server.http_url, getattr(server, "model", ""), tls=tls)

    # -- runs ----------------------------------------------------------------------------------------
    async def measure(self, server, requests, load, label: str, *, slo=None, protocol: str | None = None,
                      stop: asyncio.Event | None = None, position: int = 0, scrape: bool = True) -> dict[str, Any]:
        """One bounded run against ``server``: client metrics, and the server's own histograms
        over the same interval."""
        from benchmarks.loadgen import run_load
        from benchmarks.metrics import run_metrics, server_latency

        before = await asyncio.to_thread(server.scrape_metrics) if scrape else None
        async with self.client(server, protocol) as client:
            result = await run_load(client, requests, load, label=label, progress=self.progress,
                                    progress_position=position, stop=stop)
        after = await asyncio.to_thread(server.scrape_metrics) if scrape else None
        return {"label": label, "metrics": run_metrics(result.records, result.duration_s, slo),
                "server": server_latency(before, after) if after else {}, "run": result.to_dict()}

    async def warmup(self, server, workload: str, protocol: str | None = None) -> None:
        from benchmarks.loadgen import LoadConfig
        from benchmarks.workloads import generate_requests, load_workload

        n = self.settings.warmup_requests
        if n:
            reqs = generate_requests(load_workload(workload), n, seed=self.settings.seed + 10_000)
            await self.measure(server, reqs, LoadConfig(concurrency=2, max_duration_s=self.settings.max_run_s),
                               f"warm-up ({workload})", protocol=protocol, scrape=False)


# -- shared shapes ---------------------------------------------------------------------------------------
def comparison(name: str, title: str) -> dict[str, Any]:
    return {"name": name, "title": title, "status": "ok", "reason": "", "headline": [], "tables": [], "notes": [],
            "data": {}}


def to_ms(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x * 1e3


def ratio_of(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def note_skipped(comp: dict[str, Any], why: str) -> None:
    """Part of a comparison could not run: say why (``_settle`` sets the status at the end)."""
    comp["notes"].append(why)
    comp["reason"] = "; ".join(filter(None, [comp["reason"], why.splitlines()[0]]))


def settle(comp: dict[str, Any], has_results: bool) -> dict[str, Any]:
    comp["status"] = ("partial" if comp["reason"] else "ok") if has_results else "skipped"
    return comp


def distortion_notes(label: str, run: dict[str, Any]) -> list[str]:
    """Warnings that a run's client-side figures are not to be trusted: the load generator fell
    behind its schedule, or its TPOT is far from the server's own (tokens bunched on arrival,
    as seen on 2 cores when the client or the server's front end is starved of CPU)."""
    notes = []
    lag = run["run"].get("send_lag", {}).get("max")
    if lag is not None and lag > 0.1:
        notes.append(f"{label}: the load generator sent up to {lag * 1e3:.0f} ms late against its schedule "
                     f"(client CPU {run['run'].get('client_cpu', 0):.0%} of a core): arrivals were not Poisson")
    client, server = run["metrics"]["tpot"]["p50"], run["server"].get("tpot", {}).get("p50")
    if server and client == client and not 0.5 <= client / server <= 2.0:
        notes.append(f"{label}: client TPOT p50 {client * 1e3:.2f} ms vs the server's {server * 1e3:.2f} ms: "
                     f"tokens reached the client bunched (or the server histogram's buckets are too coarse)")
    return notes


def metrics_table(run: dict[str, Any]) -> dict[str, Any]:
    """One run's client metrics beside the server's histograms, as a report table."""
    m, srv = run["metrics"], run["server"]
    rows = []
    for key in ("ttft", "tpot", "itl", "e2e"):
        c, s = m[key], srv.get(key, {})
        rows.append([key.upper(), c["n"], to_ms(c["mean"]), to_ms(c["p50"]), to_ms(c["p90"]), to_ms(c["p99"]),
                     to_ms(s.get("p50")), to_ms(s.get("p99"))])
    return {"title": f"{m['num_completed']}/{m['num_requests']} completed in {m['duration_s']:.1f} s: "
                     f"{m['request_throughput']:.2f} req/s, {m['output_throughput']:.0f} output tok/s"
                     + (f"; SLO attainment {m['slo']['attainment']:.0%}" if "slo" in m else ""),
            "columns": ["metric (ms)", "n", "mean", "p50", "p90", "p99", "server p50", "server p99"], "rows": rows}
