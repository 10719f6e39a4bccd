"""deploy/ validates: every YAML parses, the example cluster configs load into ClusterConfig, the
`ray up` YAML has what `ray up` needs (Ray's own schema and defaults pass) with a node type for each
pool's custom resource, the KubeRay manifest has a RayCluster with head and per-pool worker groups
that start the server, and the Dockerfile copies what exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cluster.config import POOL_NAMES, ClusterConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAY_UP = DEPLOY / "ray" / "cluster.yaml"
KUBERAY = DEPLOY / "kuberay" / "raycluster.yaml"
EXAMPLES = sorted((DEPLOY / "configs").glob("*.yaml"))


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {RAY_UP, KUBERAY} <= set(files) and len(EXAMPLES) >= 3
    for path in files:
        assert load_all(path), path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_into_the_config_model(path):
    config = ClusterConfig.from_yaml(path)
    assert config.engine.device == "cuda"
    for name, pool in config.pools.items():
        assert pool.num_gpus > 0, name
        assert pool.min_workers <= pool.num_workers <= pool.max_workers
    assert config.router.host == "0.0.0.0"


def test_the_examples_are_the_documented_shapes():
    configs = {p.stem: ClusterConfig.from_yaml(p) for p in EXAMPLES}
    single = configs["single-gpu"]
    assert sum(p.num_gpus * p.num_workers for _, p in single.pools.items()) <= 1.0
    assert single.kv_transfer.transport != "nccl"  # NCCL cannot pair two processes on one GPU
    eight = configs["8gpu-2e2p4d"]
    assert [p.num_workers for _, p in eight.pools.items()] == [2, 2, 4]
    assert sum(p.num_gpus * p.num_workers for _, p in eight.pools.items()) == 8
    multi = configs["multi-node"]
    assert multi.kv_transfer.interface == "auto"
    assert all(p.resources and p.autoscaling.enabled for _, p in multi.pools.items())


# -- ray up -------------------------------------------------------------------------------------
def ray_up_config() -> dict:
    [config] = load_all(RAY_UP)
    return config


def test_ray_up_yaml_has_every_field_ray_up_needs():
    config = ray_up_config()
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in config, key
    assert config["provider"]["type"] and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert node_type["node_config"]["InstanceType"], name
        assert "resources" in node_type and "max_workers" in node_type, name
    assert sum(t["max_workers"] for t in types.values()) >= config["max_workers"] > 0
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert any("tessera serve --address auto" in c for c in config["head_start_ray_commands"])
    for target, source in config["file_mounts"].items():
        assert (ROOT / source).exists(), source  # `ray up` runs from the repository root


def test_ray_up_yaml_passes_rays_own_schema_and_defaults():
    pytest.importorskip("jsonschema")
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(ray_up_config(), schema)
    validate_config(prepare_config(ray_up_config()))  # what `ray up` does before touching AWS


def test_each_pool_has_a_ray_up_node_type_with_room_for_its_max_workers():
    pools = ClusterConfig.from_yaml(DEPLOY / "configs" / "multi-node.yaml").pools
    types = ray_up_config()["available_node_types"]
    for name, pool in pools.items():
        capacity = 0
        for node_type in types.values():
            res = node_type["resources"]
            if all(res.get(k, 0) >= v for k, v in pool.resources.items()) and res.get("GPU", 0) >= pool.num_gpus:
                per_node = min([res["GPU"] / pool.num_gpus] + [res[k] / v for k, v in pool.resources.items()])
                capacity += int(per_node) * node_type["max_workers"]
        assert capacity >= pool.max_workers, name
    assert types[ray_up_config()["head_node_type"]]["resources"].get("CPU") == 0  # no workers on the head


# -- KubeRay ------------------------------------------------------------------------------------
def kuberay_docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_all(KUBERAY)}


def test_kuberay_manifest_has_a_raycluster_with_head_and_a_worker_group_per_pool():
    docs = kuberay_docs()
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    [head] = spec["headGroupSpec"]["template"]["spec"]["containers"]
    script = " ".join(head["args"])
    assert "$KUBERAY_GEN_RAY_START_CMD" in script and "tessera serve --address auto" in script
    config_path = re.search(r"--config (\S+)", script).group(1)
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert str(Path(config_path).parent) in mounts
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 50051, 8000}
    assert head["readinessProbe"]["grpc"]["port"] == 50051  # grpc.health.v1

    # the config the head serves (a ConfigMap) is a valid ClusterConfig; each pool's resource is
    # offered by a worker group that may grow to the pool's max_workers
    configmap = docs["ConfigMap"]
    assert configmap["metadata"]["name"] in {v["configMap"]["name"] for v in
                                             spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    config = ClusterConfig.model_validate(yaml.safe_load(configmap["data"][Path(config_path).name]))
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(POOL_NAMES)
    for name, pool in config.pools.items():
        group = groups[name]
        offered = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert all(offered.get(k, 0) >= v for k, v in pool.resources.items()), name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= \
            pool.max_workers, name
        [worker] = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] >= pool.num_gpus
        assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(worker["args"])
    service = docs["Service"]
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 8000}


# -- the image ----------------------------------------------------------------------------------
def test_dockerfile_copies_existing_sources_and_every_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM \S+", text, re.M)
    copied = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            copied.add(source.strip("./"))
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        assert pattern.rstrip("*") in copied, pattern
    cmd = re.search(r'^CMD \[(.+)\]$', text, re.M).group(1)
    config = re.search(r'"(/etc/tessera/[^"]+)"', cmd).group(1)
    assert (DEPLOY / "configs" / Path(config).name).exists()
