"""API keys on every gRPC method and HTTP route when `router.api_keys` is set; health stays open."""

from __future__ import annotations

import grpc
import httpx
import pytest

from cluster.api import tessera_pb2 as pb
from cluster.api import tessera_pb2_grpc
from router.auth import is_authorized
from tests.conftest import ServedCluster

KEY = "s3cret-key-for-tests"


def test_is_authorized_compares_every_key():
    assert is_authorized(None, ())
    assert is_authorized(f"Bearer {KEY}", ("other", KEY))
    assert is_authorized(f"bearer {KEY}", (KEY,))
    for bad in (None, "", KEY, f"Bearer {KEY}x", "Basic abc", "Bearer "):
        assert not is_authorized(bad, (KEY,)), bad


@pytest.fixture(scope="module")
def keyed(ray_session, tiny_models):
    stack = ServedCluster("llava-clip-llama", tiny_models["llava-clip-llama"], router={"api_keys": [KEY]})
    yield stack
    stack.close()


def test_grpc_methods_need_the_key_health_does_not(keyed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(keyed.address) as channel:
        stub = tessera_pb2_grpc.TesseraStub(channel)
        for call in (lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
                     lambda md: stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=md),
                     lambda md: list(stub.Generate(pb.GenerateRequest(prompt="Hello"), metadata=md))):
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {KEY}"),))
        assert info.vocab_size > 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_http_routes_need_the_key_health_does_not(keyed):
    url = keyed.http_url
    body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for method, path, kwargs in (("GET", "/v1/models", {}), ("GET", "/metrics", {}),
                                 ("POST", "/v1/chat/completions", {"json": body})):
        r = httpx.request(method, url + path, timeout=30, **kwargs)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["data"]
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    # The request that was refused touched no worker: a keyed request still works normally.
    model = ok.json()["data"][0]["id"]
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={**body, "model": model})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
