"""`tessera bench`: argument parsing and the four sub-commands.

    tessera bench suite [--only NAME ...] [--quick] [--out DIR] [--no-vllm] ...   the comparisons
    tessera bench run   --target URL --workload W (--rate R | --concurrency C)   one bounded run
    tessera bench sweep --target URL --workload W --slo-ttft-ms T --slo-tpot-ms P goodput of a server
    tessera bench workloads [--show W]                                            the workload files

``--target``: ``grpc://HOST:PORT`` (Tessera's gRPC API) or ``http://HOST:PORT`` (any
OpenAI-compatible server: Tessera, vLLM, ...). Only argparse is imported at parse time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import PEER_DIR, VLLM_VENV
from benchmarks.suite import COMPARISONS


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("suite", help="run the comparisons (isolation, goodput, KV transfer, encoder cache, scaling) "
                                     "and write benchmarks/results/<date>-<machine>/")
    p.add_argument("--only", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS),
                   help="comparisons to run (default: all, in this order)")
    p.add_argument("--quick", action="store_true", help="a few requests per run: a smoke test, not a measurement")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<date>-<machine>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc",
                   help="API of the Tessera-only comparisons (goodput always uses HTTP, as the peer does)")
    p.add_argument("--slo-scale", type=float, default=5.0,
                   help="without --slo-*: SLOs = this x the first goodput server's unloaded p50 TTFT / TPOT")
    p.add_argument("--text-concurrency", type=int, default=None, help="isolation: text streams in flight")
    p.add_argument("--vl-rate", type=float, default=None, help="isolation: multi-image requests/s behind them")
    p.add_argument("--decode-workers", type=int, nargs="+", default=None,
                   help="scaling: decode-worker counts to measure (default 1 .. server cores - 1)")
    p.add_argument("--max-run-s", type=float, default=None, help="time limit of each run, seconds")
    p.add_argument("--cores", nargs="+", default=[], metavar="ROLE=CORES",
                   help="change the core layout, e.g. router=1 client=1 (roles: client router encoder prefill decode "
                        "colocated vllm vllm_compute; default: see the run's summary)")
    p.add_argument("--goodput-servers", nargs="+", choices=["disaggregated", "colocated", "vllm"], default=None,
                   help="goodput: servers to measure (default: all three)")
    p.add_argument("--no-vllm", action="store_true", help="goodput: leave vLLM out")
    p.add_argument("--vllm-venv", type=Path, default=VLLM_VENV,
                   help="venv with vLLM's CPU build (installed there by the peer script if missing)")
    p.add_argument("--peer-dir", type=Path, default=PEER_DIR, help="the peer scripts (install.sh, serve.sh)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="extra `vllm serve` argument")
    _add_slo(p)
    _add_progress(p)
    p.set_defaults(bench_func=cmd_suite)

    p = sub.add_parser("run", help="one bounded load run against a running server (any OpenAI-compatible one)")
    _add_target(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s ('inf': all at once)")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--max-duration", type=float, default=300.0, help="time limit of the run, seconds")
    _add_slo(p)
    _add_progress(p)
    p.set_defaults(bench_func=cmd_run)

    p = sub.add_parser("sweep", help="goodput of a running server: a bounded rate sweep against an SLO")
    _add_target(p)
    p.add_argument("--start-rate", type=float, default=0.5)
    p.add_argument("--max-probes", type=int, default=7)
    p.add_argument("--probe-seconds", type=float, default=40.0, help="requests per probe = rate x this")
    p.add_argument("--max-duration", type=float, default=180.0, help="time limit of each probe, seconds")
    _add_slo(p, required=True)
    _add_progress(p)
    p.set_defaults(bench_func=cmd_sweep)

    p = sub.add_parser("workloads", help="list the workload files, or show the requests one draws")
    p.add_argument("--show", default=None, metavar="NAME|FILE")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(bench_func=cmd_workloads)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, metavar="URL",
                   help="grpc://HOST:PORT (Tessera gRPC) or http://HOST:PORT (OpenAI-compatible)")
    p.add_argument("--model", default="", help="HTTP: model name (default: the server's first)")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="TLS (grpc:// or https:// target): PEM CA certificate(s) that signed the server's certificate")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="mutual TLS: this client's PEM certificate")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="mutual TLS: the PEM private key of --tls-cert")
    p.add_argument("--metrics-url", default="",
                   help="Prometheus /metrics to cross-check with (default: TARGET/metrics for http targets)")
    p.add_argument("--workload", default="multi_image", metavar="NAME|FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-cores", type=int, nargs="+", default=None,
                   help="pin this load generator to these cores (keep it off the server's decode core)")
    p.add_argument("--out", type=Path, default=None, help="also write results.json + summary.md + plots here")


def _add_slo(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--slo-ttft-ms", type=float, default=None, required=required)
    p.add_argument("--slo-tpot-ms", type=float, default=None, required=required)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def command_line() -> str:
    """The command as typed (the `tessera` script, or python -m ...)."""
    if Path(sys.argv[0]).name == "tessera":
        return "tessera " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


# -- suite -------------------------------------------------------------------------------------------
def cmd_suite(args) -> int:
    from benchmarks.affinity import CoreLayout, available_cores, pin_self
    from benchmarks.report import machine_info, results_dir, write_report
    from benchmarks.harness import Settings, Suite
    from benchmarks.suite import run_all

    cores = available_cores()
    info = machine_info(cores)
    overrides = {k: v for k, v in {
        "seed": args.seed, "protocol": args.protocol, "slo_scale": args.slo_scale, "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms, "text_concurrency": args.text_concurrency, "vl_rate": args.vl_rate,
        "max_run_s": args.max_run_s,
        "goodput_servers": tuple(s for s in (args.goodput_servers or ("disaggregated", "colocated", "vllm"))
                                 if not (args.no_vllm and s == "vllm")),
        "decode_workers": tuple(args.decode_workers) if args.decode_workers else None}.items() if v is not None}
    settings = (Settings.quick if args.quick else Settings)(**overrides)
    layout = CoreLayout.for_cores(cores).with_overrides(args.cores)
    out_dir = args.out or results_dir(info)
    suite = Suite(settings, layout, out_dir, progress=not args.no_progress, vllm_venv=args.vllm_venv, peer_dir=args.peer_dir, vllm_args=args.vllm_arg)
    pin_self(layout.client)  # the load generator stays off the decode core; servers pin themselves
    started = datetime.now().isoformat(timespec="seconds")
    print(f"tessera bench: {', '.join(args.only)} -> {out_dir}\ncores: {layout.describe()}", file=sys.stderr)
    try:
        comparisons = asyncio.run(run_all(suite, args.only))
    finally:
        suite.stop_all()
    results = {"command": command_line(), "started_at": started, "machine": info, "layout": layout.to_dict(),
               "layout_description": layout.describe() + ("; " + "; ".join(layout.notes) if layout.notes else ""),
               "settings": settings.to_dict(), "quick": args.quick, "comparisons": comparisons,
               "models": suite.models, "placement": suite.placement}
    summary = write_report(out_dir, results)
    print(summary.read_text())
    print(f"results: {out_dir}", file=sys.stderr)
    return 0 if all(c["status"] != "failed" for c in comparisons) else 1


# -- run / sweep against a server someone else started --------------------------------------------------
class RemoteServer:
    """Only an address and (maybe) a /metrics URL."""

    def __init__(self, args):
        from cluster.client import ClientTLS

        self.http_url = args.target.rstrip("/").removesuffix("/v1") if args.target.startswith("http") else ""
        self.tls = ClientTLS.of(args.tls_ca, args.tls_cert, args.tls_key)  # the clients' and the scrape's
        self.grpc_address = "" if self.http_url else args.target.removeprefix("grpc://")
        self.model = args.model
        self.metrics_url = args.metrics_url or (f"{self.http_url}/metrics" if self.http_url else "")

    def scrape_metrics(self) -> str | None:
        import httpx

        if not self.metrics_url:
            return None
        try:
            resp = httpx.get(self.metrics_url, timeout=10.0, verify=self.tls.ssl_context() if self.tls else True)
            return resp.text if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None


def _remote(args):
    from benchmarks.affinity import CoreLayout, available_cores, pin_self
    from benchmarks.harness import Settings, Suite

    if args.client_cores:
        pin_self(args.client_cores)
    settings = Settings(seed=args.seed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                        protocol="http" if args.target.startswith("http") else "grpc", warmup_requests=0)
    suite = Suite(settings, CoreLayout.for_cores(available_cores()), args.out or Path("."),
                  progress=not args.no_progress)
    return suite, RemoteServer(args)


def cmd_run(args) -> int:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.harness import comparison, metrics_table
    from benchmarks.workloads import generate_requests, load_workload

    suite, server = _remote(args)
    spec = load_workload(args.workload)
    load = (LoadConfig(rate=args.rate, max_duration_s=args.max_duration, seed=args.seed) if args.rate is not None
            else LoadConfig(concurrency=args.concurrency, max_duration_s=args.max_duration))
    reqs = generate_requests(spec, args.num_requests, args.seed)
    run = asyncio.run(suite.measure(server, reqs, load, f"{spec.name} {load.mode}", slo=suite.settings.slo()))
    how = f"at {args.rate:g} req/s" if args.rate is not None else f"at concurrency {args.concurrency}"
    comp = comparison("run", f"{spec.name}, {load.mode} {how}, against {args.target}")
    comp["tables"].append(metrics_table(run))
    comp["data"] = {"metrics": run["metrics"], "server": run["server"], "runs": [run["run"]]}
    return _finish_remote(args, comp)


def cmd_sweep(args) -> int:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import GoodputSearch
    from benchmarks.harness import comparison
    from benchmarks.workloads import generate_requests, load_workload

    suite, server = _remote(args)
    spec, slo = load_workload(args.workload), suite.settings.slo()

    async def sweep():
        search, probes = GoodputSearch(args.start_rate, max_probes=args.max_probes), []
        while (rate := search.next_rate()) is not None:
            n = max(int(rate * args.probe_seconds), 8)
            run = await suite.measure(server, generate_requests(spec, n, args.seed + len(probes)),
                                      LoadConfig(rate=rate, max_duration_s=args.max_duration, seed=args.seed),
                                      f"{rate:.3g} req/s", slo=slo)
            attainment = run["metrics"]["slo"]["attainment"]
            search.record(rate, attainment)
            probes.append({"rate": rate, "attainment": attainment, "metrics": run["metrics"], "run": run["run"]})
        return search.result(), probes

    result, probes = asyncio.run(sweep())
    comp = comparison("goodput", f"Goodput of {args.target} on {spec.name}")
    comp["headline"].append({"metric": "goodput, req/s", "value": result.goodput_rps, "target": "", "met": None})
    comp["tables"].append({"title": f"Probes (SLO: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms)",
                           "columns": ["rate req/s", "SLO attainment", "done", "sent", "TTFT p50 ms", "TPOT p50 ms"],
                           "rows": [[p["rate"], p["attainment"], p["metrics"]["num_completed"],
                                     p["metrics"]["num_requests"], _ms(p["metrics"]["ttft"]["p50"]),
                                     _ms(p["metrics"]["tpot"]["p50"])] for p in probes]})
    comp["notes"].append(f"search ended: {result.reason}")
    comp["data"] = {"slo": slo.to_dict(), "target": 0.9,
                    "targets": {args.target: {**result.to_dict(), "probes": [
                        {"rate": p["rate"], "attainment": p["attainment"]} for p in probes]}},
                    "runs": [p["run"] for p in probes]}
    return _finish_remote(args, comp)


def _ms(x):
    return None if x is None else x * 1e3


def _finish_remote(args, comp: dict[str, Any]) -> int:
    from benchmarks.report import markdown_table

    for table in comp["tables"]:
        print(table.get("title", ""))
        print("\n".join(markdown_table(table["columns"], table["rows"])))
    for note in comp["notes"]:
        print(note)
    if args.out:
        from benchmarks.report import machine_info, write_report

        results = {"command": command_line(), "started_at": datetime.now().isoformat(timespec="seconds"),
                   "machine": machine_info(), "layout": {},
                   "layout_description": f"load generator on cores {sorted(os.sched_getaffinity(0))}; the server's "
                                         f"placement is not known to this command",
                   "settings": {}, "comparisons": [comp]}
        print(f"written: {write_report(args.out, results)}", file=sys.stderr)
    return 0


def cmd_workloads(args) -> int:
    from benchmarks.workloads import generate_requests, list_workloads, load_workload, workload_digest

    if not args.show:
        for name in list_workloads():
            spec = load_workload(name)
            print(f"{name:<16} {spec.modality:<6} {spec.description}")
        return 0
    spec = load_workload(args.show)
    reqs = generate_requests(spec, args.num_requests, args.seed)
    for r in reqs:
        print(f"#{r.index:<3} {r.component:<14} images {r.num_images} audios {r.num_audios} max_tokens "
              f"{r.max_tokens:<4} media {sum(len(m.data) for m in r.media):>8} B  {r.digest()[:12]}  {r.text[:50]}")
    print(f"workload digest (seed {args.seed}): {workload_digest(reqs)}")
    return 0


def main(args) -> int:
    """`tessera bench` (``args`` parsed with ``add_bench_arguments``)."""
    try:
        return args.bench_func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
