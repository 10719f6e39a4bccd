"""benchmarks.report / plots / affinity / servers' config fitting and the `tessera bench` parser:
fast, no servers."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.affinity import CoreLayout, allowed_cores, available_cores
from benchmarks.report import machine_info, machine_slug, results_dir, write_report
from benchmarks.servers import ServerUnavailable, fit_to_cluster_config, tessera_config


def test_core_layouts():
    two = CoreLayout.for_cores([0, 1])
    assert two.decode == [1] and 1 not in two.client and two.colocated == [0, 1]
    assert set(two.encoder + two.prefill + two.router) == {0}
    four = CoreLayout.for_cores([0, 1, 2, 3])
    assert four.client == [3] and four.decode == [2] and 3 not in four.colocated
    assert not set(four.client) & set(four.encoder + four.prefill + four.decode)
    moved = two.with_overrides(["router=1", "client=1"])
    assert moved.router == [1] and moved.client == [1] and "overridden" in moved.notes[-1]
    with pytest.raises(ValueError, match="ROLE"):
        two.with_overrides(["gpu=1"])
    assert allowed_cores(__import__("os").getpid())  # /proc readable
    assert available_cores()


def test_cluster_config_fits_this_checkout():
    from cluster.config import ClusterConfig, PoolConfig

    roles = {k: v for k, v in CoreLayout.for_cores([0, 1]).to_dict().items() if k != "notes"}
    config, notes = fit_to_cluster_config(tessera_config("disaggregated", "/m", roles, num_decode=2))
    parsed = ClusterConfig.model_validate(config)
    assert parsed.pools.decode.num_workers == 2 and parsed.router.grpc_port == 0
    assert ("cpu_affinity" in PoolConfig.model_fields) == (not notes)
    colocated = tessera_config("colocated", "/m", roles)
    if "mode" not in ClusterConfig.model_fields:
        with pytest.raises(ServerUnavailable, match="colocated"):
            fit_to_cluster_config(colocated)
    else:
        fit_to_cluster_config(colocated)


def test_machine_description_and_folder(tmp_path):
    info = machine_info([0, 1])
    assert info["usable_cores"] == [0, 1] and info["memory_gib"] > 0 and "torch" in info["versions"]
    assert machine_slug({**info, "gpu": "none", "cpu_model": "AMD EPYC 7R13 Processor"}) == "cpu2c-amd-epyc-7r13"
    assert machine_slug({**info, "gpu": "1 x NVIDIA H100 80GB HBM3"}) == "h100-x1"
    first = results_dir(info, tmp_path)
    first.mkdir()
    (first / "results.json").write_text("{}")
    assert results_dir(info, tmp_path).name == first.name + "-2"


def test_write_report(tmp_path):
    comp = {"name": "kv_transfer", "title": "KV transfer", "status": "ok", "reason": "",
            "headline": [{"metric": "gloo share", "value": 0.7, "target": ">= 0.6", "met": True}],
            "tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1.23456, math.nan]]}], "notes": ["n1"],
            "data": {"memcpy": [{"bytes": 2**20, "gbps": 10.0}, {"bytes": 2**23, "gbps": 8.0}],
                     "transports": {"gloo": [{"bytes": 2**20, "gbps": 1.0}, {"bytes": 2**23, "gbps": 6.0}]}}}
    skipped = {"name": "goodput", "title": "Goodput", "status": "skipped", "reason": "no vLLM", "headline": [],
               "tables": [], "notes": [], "data": {}}
    results = {"command": "tessera bench suite", "started_at": "2026-01-01T00:00:00", "machine": machine_info([0, 1]),
               "layout": {}, "layout_description": "client 0", "settings": {"seed": 0},
               "comparisons": [comp, skipped], "placement": [{"process": "p", "pid": 1, "cores": "0"}]}
    summary = write_report(tmp_path, results).read_text()
    assert "| KV transfer | gloo share | 0.7 | >= 0.6 | yes |" in summary
    assert "| Goodput | skipped |" in summary and "**skipped**: no vLLM" in summary
    assert "| 1.23 | – |" in summary and "`tessera bench suite`" in summary
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN became null
    assert data["comparisons"][0]["tables"][0]["rows"][0] == [1.23456, None]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "kv_transfer.png").stat().st_size > 1000
    assert "![KV transfer](plots/kv_transfer.png)" in summary


def test_bench_command_line(capsys):
    from cluster.cli import build_parser, main

    args = build_parser().parse_args(["bench", "suite", "--quick", "--only", "kv_transfer", "--no-vllm"])
    assert args.bench_command == "suite" and args.only == ["kv_transfer"] and args.quick
    args = build_parser().parse_args(["bench", "run", "--target", "http://127.0.0.1:1", "--rate", "2"])
    assert args.rate == 2.0 and args.workload == "multi_image"
    with pytest.raises(SystemExit):  # open loop or closed loop, not both
        build_parser().parse_args(["bench", "run", "--target", "x", "--rate", "1", "--concurrency", "2"])
    assert main(["bench", "workloads"]) == 0
    assert "multi_image" in capsys.readouterr().out
    assert main(["bench", "workloads", "--show", "nope"]) == 2


def test_peer_client_loads_and_slo_rule():
    from benchmarks.peer_client import IMAGE_RATES, SLO_TPOT_MS, SLO_TTFT_MS, loads, meets_slo

    full = loads(quick=False)
    assert [lb for lb, _, _ in full] == ["text 32 streams"] + [f"images @ {r:g} req/s" for r in IMAGE_RATES]
    assert full[0][2] == 128 and "--max-concurrency" in full[0][1]
    assert all("--request-rate" in flags and n >= 40 for _, flags, n in full[1:])
    assert len(loads(quick=True)) == 2
    ok = {"completed": 60, "num_prompts": 60, "p99_ttft_ms": SLO_TTFT_MS, "p99_tpot_ms": SLO_TPOT_MS - 1}
    assert meets_slo(ok)
    assert not meets_slo({**ok, "p99_tpot_ms": SLO_TPOT_MS + 0.1})
    assert not meets_slo({**ok, "completed": 59})  # a failed request fails the rate
    assert not meets_slo({**ok, "p99_ttft_ms": None})


def test_serve_each_skips_servers_that_cannot_start_and_always_stops_the_others(tmp_path):
    import asyncio
    from contextlib import aclosing

    from benchmarks.affinity import CoreLayout
    from benchmarks.harness import Settings, Suite, comparison

    class Server:
        def __init__(self, name):
            self.name, self.stopped = name, False

        def stop(self):
            self.stopped = True

    started = []

    async def start(name):
        started.append(Server(name))
        return started[-1]

    async def unavailable():
        raise ServerUnavailable("no venv")

    suite = Suite(Settings.quick(), CoreLayout.for_cores([0, 1]), tmp_path)
    comp = comparison("x", "x")
    seen = []

    async def main():
        async with aclosing(suite.serve_each(comp, [("a", lambda: start("a")), ("peer", unavailable),
                                                   ("b", lambda: start("b"))])) as servers:
            async for name, server in servers:
                seen.append((name, server.stopped))
                if name == "b":
                    raise RuntimeError("the run broke")

    with pytest.raises(RuntimeError, match="the run broke"):
        asyncio.run(main())
    assert seen == [("a", False), ("b", False)]
    assert [s.stopped for s in started] == [True, True]
    assert "peer: no venv" in comp["notes"] and "no venv" in comp["reason"]
