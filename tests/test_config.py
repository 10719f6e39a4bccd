"""Cluster config: YAML in, validated, closed (unknown keys rejected), documented."""

import subprocess
import sys
import textwrap

import pytest

from cluster.config import ClusterConfig, config_reference, config_reference_markdown


def write(tmp_path, text: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_need_no_file_and_bind_to_localhost():
    config = ClusterConfig()
    assert config.router.host == "127.0.0.1"
    assert config.router.grpc_port == 50051
    assert config.kv_transfer.transport == "auto"  # shm on one host, gloo across nodes
    assert [name for name, _ in config.pools.items()] == ["encoder", "prefill", "decode"]
    assert all(pool.num_workers == 1 for _, pool in config.pools.items())


def test_yaml_parses_every_section(tmp_path):
    path = write(tmp_path, """
        engine:
          model: /models/llava
          dtype: bfloat16
          device: cuda
          block_size: 32
          limits: {max_media_per_request: 4}
        pools:
          encoder: {num_workers: 2, num_gpus: 0.5, max_batch_size: 8, cache_mb: 64}
          prefill: {num_workers: 3, num_cpus: 2, num_gpus: 1, resources: {prefill_node: 1}}
          decode: {num_workers: 1, num_gpus: 1, scheduling_strategy: SPREAD}
        kv_transfer: {transport: nccl, timeout_s: 10, interface: 10.0.0.5}
        router: {host: 0.0.0.0, grpc_port: 6000, max_message_mb: 16, max_queued_requests: 8}
        startup_timeout_s: 60
    """)
    config = ClusterConfig.from_yaml(path)
    assert config.engine.model == "/models/llava" and config.engine.dtype == "bfloat16"
    assert config.engine.block_size == 32 and config.engine.limits.max_media_per_request == 4
    assert config.pools.encoder.num_workers == 2 and config.pools.encoder.max_batch_size == 8
    assert config.pools.prefill.resources == {"prefill_node": 1.0}
    assert config.pools.decode.scheduling_strategy == "SPREAD"
    assert config.kv_transfer.transport == "nccl" and config.kv_transfer.interface == "10.0.0.5"
    assert config.router.host == "0.0.0.0" and config.router.max_queued_requests == 8
    assert config.startup_timeout_s == 60
    # untouched keys keep their defaults
    assert config.pools.decode.num_cpus == 0.5 and config.router.http_port == 8000


def test_empty_file_is_the_defaults(tmp_path):
    assert ClusterConfig.from_yaml(write(tmp_path, "")) == ClusterConfig()


def test_round_trips_through_yaml(tmp_path):
    config = ClusterConfig().with_overrides(router={"grpc_port": 7000}, kv_transfer={"transport": "ray"})
    path = tmp_path / "out.yaml"
    path.write_text(config.to_yaml())
    assert ClusterConfig.from_yaml(path) == config


@pytest.mark.parametrize("text, key", [
    ("pool: {}", "pool"),  # typo at the top level
    ("router: {grpc_prot: 1}", "grpc_prot"),
    ("pools: {decode: {gpus: 1}}", "gpus"),
    ("pools: {prefill: {max_batch_size: 4}}", "max_batch_size"),  # encoder-only option
    ("engine: {modle: x}", "modle"),
    ("kv_transfer: {transport: gloo, port: 1}", "port"),
])
def test_unknown_keys_are_rejected_by_name(tmp_path, text, key):
    with pytest.raises(ValueError, match=key):
        ClusterConfig.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize("text", [
    "pools: {encoder: {num_workers: -1}}",
    "pools: {decode: {num_gpus: -0.5}}",
    "pools: {prefill: {resources: {GPU: 1}}}",  # use num_gpus
    "pools: {decode: {scheduling_strategy: RANDOM}}",
    "kv_transfer: {transport: tcp}",
    "kv_transfer: {timeout_s: 0}",
    "router: {grpc_port: 70000}",
    "router: {max_message_mb: 0}",
    "router: {max_inflight_requests: 0}",
    "engine: {dtype: int8}",
    "startup_timeout_s: -1",
    "pools: {decode: {num_workers: many}}",
    "engine: {device: cuda}",  # the pools ask for no GPU
    "kv_transfer: {transport: nccl}",  # on CPU
])
def test_bad_values_are_rejected(tmp_path, text):
    with pytest.raises(ValueError, match="invalid cluster config"):
        ClusterConfig.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize("text", ["- a\n- b\n", "router: [1, 2", "just a string"])
def test_malformed_yaml_is_a_clear_error(tmp_path, text):
    with pytest.raises(ValueError, match="cluster.yaml"):
        ClusterConfig.from_yaml(write(tmp_path, text))


def test_every_field_is_documented():
    rows = config_reference()
    assert len(rows) > 30
    undocumented = [key for key, _, _, desc in rows if not desc]
    assert not undocumented
    table = config_reference_markdown()
    assert "| `kv_transfer.transport` |" in table and "| `pools.encoder.cache_mb` |" in table


def test_markdown_reference_and_check_commands(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.config", "--markdown"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("| key | type | default | description |")
    bad = write(tmp_path, "router: {grpc_prot: 1}")
    out = subprocess.run([sys.executable, "-m", "cluster.config", "--check", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "grpc_prot" in out.stderr
