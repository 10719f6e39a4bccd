"""The servers a comparison measures, each in its own process, pinned, on 127.0.0.1.

* ``TesseraServer``: ``python -m cluster.cli serve --config <generated YAML>`` with ports 0; the
  addresses are read from its start-up lines. Disaggregated (encoder / prefill / decode pools) or
  colocated (``mode: colocated``: one ``ColocatedWorker`` running every phase, same router).
* ``VllmServer``: the peer engine, ``../shared/peers/vllm-cpu/serve.sh``, with its caches off.

Pinning: the server process (router, Ray driver, Ray's daemons) starts on the ``router`` cores;
each worker actor pins itself when the config has ``PoolConfig.cpu_affinity``, and after start-up
every actor found below the server (by its ``ray::<Class>`` process title) is pinned again here,
all threads, so the layout holds whichever config fields exist. The masks actually observed are
returned by ``placement()`` for the report.

Every process here is started by us in its own session; ``stop`` ends it by its pid (SIGINT,
then SIGTERM), and its process group (our session) only if it will not go.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.affinity import allowed_cores, find_actors, pin_process

REPO_ROOT = Path(__file__).resolve().parents[1]
_GRPC_LINE = re.compile(r"^\s*gRPC\s+(\S+)")
_HTTP_LINE = re.compile(r"^\s*HTTP\s+http://(\S+?)/v1")


class ServerUnavailable(RuntimeError):
    """This server (or mode) cannot run here; the comparison records why and goes on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, num_lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return ""


class ServerProcess:
    """A command in its own session, pinned to ``cores``, output teed to ``log_path``."""

    def __init__(self, name: str, cmd: list[str], *, cores: list[int] | None, log_path: Path,
                 env: dict[str, str] | None = None):
        self.name, self.cmd, self.cores, self.log_path = name, cmd, cores, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def _spawn(self) -> None:
        cores = self.cores
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, text=True, bufsize=1,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        self._reader = threading.Thread(target=self._drain, name=f"{self.name}-log", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if len(self._lines) < 10_000:
                    self._lines.append(line.rstrip("\n"))

    def _wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"{self.name} exited with {self.proc.returncode} before {what}; "
                                        f"log {self.log_path}:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(f"{self.name}: no {what} within {timeout_s:.0f} s; log {self.log_path}:\n"
                                        f"{log_tail(self.log_path)}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 15.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        if proc.poll() is None:  # our own session: its process group is what we started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def scrape_metrics(self, timeout_s: float = 10.0) -> str | None:
        """The Prometheus text of ``/metrics`` (None if the server has none)."""
        import httpx

        url = getattr(self, "http_url", "")
        if not url:
            return None
        try:
            resp = httpx.get(f"{url}/metrics", timeout=timeout_s)
            return resp.text if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None


# -- Tessera ----------------------------------------------------------------------------------------
def tessera_config(mode: str, model_dir: str, roles: dict[str, list[int]], *, num_decode: int = 1,
                   colocated_threads: int = 1, engine: dict[str, Any] | None = None,
                   kv_transfer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cluster config of one benchmarked deployment (as YAML data).

    Disaggregated: one encoder, one prefill, ``num_decode`` decode workers, each pinned to its
    role's cores (``PoolConfig.cpu_affinity``), KV over ``shm`` (one host). Colocated: ``mode:
    colocated`` and one worker on ``roles["colocated"]``. Ray's CPU reservations are small (0.1):
    pinning decides placement on this machine, and more decode workers than cores must still start."""
    def pool(role: str, num: int, threads: int = 1) -> dict[str, Any]:
        return {"num_workers": num, "min_workers": min(1, num), "num_cpus": 0.1, "torch_threads": threads,
                "cpu_affinity": list(roles[role])}

    config: dict[str, Any] = {
        "engine": {"model": model_dir, **(engine or {})},
        "router": {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0},
    }
    if mode == "colocated":
        config["mode"] = "colocated"
        config["pools"] = {"colocated": pool("colocated", 1, colocated_threads)}
    else:
        config["pools"] = {"encoder": pool("encoder", 1), "prefill": pool("prefill", 1),
                           "decode": pool("decode", num_decode)}
        # every worker is on this host: shm is the fastest CPU transport
        config["kv_transfer"] = {"transport": "shm", **(kv_transfer or {})}
    return config


def fit_to_cluster_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``config`` reduced to what this checkout's ``ClusterConfig`` knows, and notes on what was
    dropped. Raises ServerUnavailable when the mode itself is missing (colocated before the lead
    wires it)."""
    from cluster.config import ClusterConfig, PoolConfig, PoolsConfig

    notes, config = [], {**config}
    if "mode" in config and "mode" not in ClusterConfig.model_fields:
        raise ServerUnavailable("colocated mode is not wired yet: ClusterConfig has no `mode` field "
                                "(expected `mode: colocated` serving one ColocatedWorker behind the same router)")
    pools = dict(config.get("pools", {}))
    for name in list(pools):
        if name not in PoolsConfig.model_fields:
            notes.append(f"PoolsConfig has no `{name}` pool: its settings were dropped (the worker is pinned "
                         f"from outside instead)")
            pools.pop(name)
            continue
        if "cpu_affinity" in pools[name] and "cpu_affinity" not in PoolConfig.model_fields:
            pools[name] = {k: v for k, v in pools[name].items() if k != "cpu_affinity"}
            notes.append("PoolConfig has no `cpu_affinity`: workers are pinned from outside after start-up")
    config["pools"] = pools
    try:
        ClusterConfig.model_validate(config)
    except ValueError as exc:
        raise ServerUnavailable(f"the benchmark's cluster config is invalid here: {exc}") from None
    return config, sorted(set(notes))


class TesseraServer(ServerProcess):
    """``address``: join that Ray cluster (``serve --address``) instead of starting a local one."""

    def __init__(self, name: str, mode: str, config: dict[str, Any], roles: dict[str, list[int]], log_dir: Path,
                 address: str | None = None):
        config, self.notes = fit_to_cluster_config(config)
        self.mode, self.roles = mode, roles
        self.config_path = log_dir / f"{name}.yaml"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--config", str(self.config_path)]
        super().__init__(name, cmd + (["--address", address] if address else []),
                         cores=roles["router"], log_path=log_dir / f"{name}.log",
                         env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": ""})
        self.grpc_address = ""
        self.http_url = ""

    def start(self, timeout_s: float = 600.0) -> "TesseraServer":
        self._spawn()

        def ready() -> bool:
            for line in self._lines:
                if (m := _GRPC_LINE.match(line)) and not self.grpc_address:
                    self.grpc_address = m.group(1)
                if (m := _HTTP_LINE.match(line)) and not self.http_url:
                    self.http_url = f"http://{m.group(1)}"
            return bool(self.grpc_address and self.http_url)

        self._wait_for(ready, timeout_s, "serving addresses")
        self.pin_workers()
        return self

    def pin_workers(self) -> dict[str, list[int]]:
        """Pin every worker actor (all threads) to its role's cores; {role: [pid]}."""
        actors = find_actors(self.pid)
        for role, pids in actors.items():
            for pid in pids:
                pin_process(pid, self.roles[role])
        return actors

    def placement(self) -> list[dict[str, Any]]:
        """Which cores each process of this server may run on, as observed in /proc."""
        rows = [{"process": f"{self.name} server (router, Ray driver)", "pid": self.pid,
                 "cores": allowed_cores(self.pid)}]
        for role, pids in sorted(find_actors(self.pid).items()):
            rows += [{"process": f"{self.name} {role} worker", "pid": pid, "cores": allowed_cores(pid)} for pid in pids]
        return rows

    def cluster_status(self) -> dict[str, Any]:
        from cluster.client import TesseraClient

        with TesseraClient(self.grpc_address) as client:
            return client.status()


# -- vLLM (the peer) ----------------------------------------------------------------------------------
VLLM_FAIRNESS_FLAGS = ("--no-enable-prefix-caching", "--mm-processor-cache-gb", "0")


class VllmServer(ServerProcess):
    def __init__(self, name: str, venv: Path, peer_dir: Path, model_dir: str, *, cores: list[int],
                 compute_cores: list[int], log_dir: Path, extra_args: list[str] = ()):
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = ""
        self.notes: list[str] = []
        cmd = ["bash", str(peer_dir / "serve.sh"), str(venv), model_dir, str(self.port), *VLLM_FAIRNESS_FLAGS,
               *extra_args]
        super().__init__(name, cmd, cores=cores, log_path=log_dir / f"{name}.log",
                         env={"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, compute_cores))})

    def start(self, timeout_s: float = 600.0) -> "VllmServer":
        import httpx

        self._spawn()

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.http_url}/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait_for(healthy, timeout_s, "healthy /health")
        return self

    def placement(self) -> list[dict[str, Any]]:
        from benchmarks.affinity import descendants, process_title

        rows = [{"process": f"{self.name} (serve.sh)", "pid": self.pid, "cores": allowed_cores(self.pid)}]
        for pid in descendants(self.pid):
            rows.append({"process": f"{self.name} {process_title(pid)[:40]}", "pid": pid, "cores": allowed_cores(pid)})
        return rows


def ensure_vllm(venv: Path, peer_dir: Path, log_path: Path, timeout_s: float = 1800.0) -> None:
    """vLLM's CPU build importable in ``venv`` (installed there with the peer's script if not yet);
    raises ServerUnavailable saying why it cannot be."""
    def works() -> bool:
        python = venv / "bin" / "python"
        if not python.exists():
            return False
        try:
            return subprocess.run([str(python), str(peer_dir / "vllm_cli.py"), "--version"], capture_output=True,
                                  timeout=300).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    if not (peer_dir / "install.sh").exists():
        raise ServerUnavailable(f"no peer scripts at {peer_dir}")
    if works():
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(["bash", str(peer_dir / "install.sh"), str(venv)], stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            raise ServerUnavailable(f"installing vLLM took over {timeout_s:.0f} s; log {log_path}") from None
    if rc != 0 or not works():
        raise ServerUnavailable(f"vLLM's CPU build could not be installed into {venv} (exit {rc}); log {log_path}:\n"
                                f"{log_tail(log_path, 15)}")
