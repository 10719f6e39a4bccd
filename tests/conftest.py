"""Shared fixtures: one tiny checkpoint per architecture and one Ray instance per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llava-clip-llama", "llava-siglip-qwen2", "qwen2-audio")


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
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
