"""Shared fixtures: one tiny checkpoint per architecture and one Ray instance per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TESSERA_FAULT_INJECTION", "1")  # lets tests arm cluster.faults in the workers (Ray
# workers inherit it); the engine fixtures of other tests never arm anything

ARCHS = ("llava-clip-llama", "llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen2-audio")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """arch -> path of a tiny random-weight checkpoint, built once per session."""
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it; shut down at the end."""
    import ray

    if not ray.is_initialized():
        # Local workers inherit this process's environment (HF_HUB_OFFLINE etc. are set above);
        # a runtime_env would only add ~10 s of setup to every worker start.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Engine settings of the test clusters: a small KV cache (fast to allocate, still room for 32
# concurrent two-image requests) and the same settings for the colocated reference.
TEST_ENGINE = {"kv_cache_memory_gb": 0.1}


class ServedCluster:
    """A real cluster (one encoder, prefill and decode actor) + the router (gRPC and HTTP) + a gRPC client."""

    def __init__(self, arch: str, model_path, **overrides):
        from cluster.client import TesseraClient
        from cluster.config import ClusterConfig
        from cluster.launch import Cluster
        from router.service import BackgroundRouter

        self.arch = arch
        self.config = ClusterConfig().with_overrides(
            engine={"model": str(model_path), **TEST_ENGINE, **overrides.get("engine", {})},
            router={"grpc_port": 0, "http_port": 0, **overrides.get("router", {})},
            kv_transfer=overrides.get("kv_transfer", {}),
            **{s: overrides[s] for s in ("pools", "controller", "mode") if s in overrides})  # test_scaling.py
        self.cluster = Cluster(self.config).start()
        try:
            self.router = BackgroundRouter(self.cluster, serve_http=True).start()
        except BaseException:
            self.cluster.shutdown()
            raise
        self.address = self.router.address
        self.http_url = f"http://{self.router.http_address}"  # the OpenAI-compatible API
        self.client = TesseraClient(self.address)

    @property
    def core(self):
        return self.router.core

    def close(self) -> None:
        self.client.close()
        self.router.stop()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def served_cluster(ray_session, tiny_models):
    """``served_cluster(arch, **overrides) -> ServedCluster``, started once per module, architecture
    and overrides (as ``ServedCluster`` takes them). Only one runs at a time (asking for another
    stops the previous one): order tests by arch."""
    current: dict[tuple, ServedCluster] = {}

    def get(arch: str, **overrides) -> ServedCluster:
        key = (arch, repr(sorted(overrides.items())))
        if key not in current:
            for stack in current.values():
                stack.close()
            current.clear()
            current[key] = ServedCluster(arch, tiny_models[arch], **overrides)
        return current[key]

    yield get
    for stack in current.values():
        stack.close()
