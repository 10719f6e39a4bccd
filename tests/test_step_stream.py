"""The token stream (``cluster.step_stream``) between a real listener and the router's client, in
this process over loopback: one message per step, merged for a slow reader, strangers refused,
and both ends told when it ends."""

from __future__ import annotations

import asyncio
import socket
import threading

import msgpack
import pytest

from cluster import channel_auth, step_stream
from cluster.step_stream import StepStreamClient, StepStreamServer, merge_deltas


class Lost:
    def __init__(self):
        self.ids: list[str] = []
        self.event = threading.Event()

    def __call__(self, stream_id: str) -> None:
        self.ids.append(stream_id)
        self.event.set()


@pytest.fixture
def server():
    lost = Lost()
    srv = StepStreamServer("decode-t", "127.0.0.1", lost)
    srv.lost = lost
    yield srv
    srv.close()


async def connect(srv: StepStreamServer, stream_id: str = "router-a"):
    got: list = []
    lost: list[str] = []
    info = srv.issue(stream_id)
    client = await StepStreamClient.connect(info["host"], info["port"], stream_id, info["ticket"],
                                            got.append, lost.append)
    return client, got, lost


async def until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_merge_concatenates_tokens_per_request_in_order():
    steps = [[["a", [1], None], ["b", [7], None]], [["a", [2], None]], [["b", [8], "stop"], ["a", [3], None]]]
    assert merge_deltas(steps) == [["a", [1, 2, 3], None], ["b", [7, 8], "stop"]]
    assert merge_deltas(steps[:1]) == steps[0]
    # a request with logprobs: one [logprob, top] per token, concatenated with its tokens
    lp = [[-0.5, [[1, -0.5]]], [-1.0, [[2, -1.0]]], [-2.0, [[9, -0.1]]]]
    with_lp = [[["a", [1], None, lp[:1]], ["b", [7], None]], [["a", [2, 3], "length", lp[1:]]]]
    assert merge_deltas(with_lp) == [["a", [1, 2, 3], "length", lp], ["b", [7], None]]


def test_one_message_per_step_with_every_requests_tokens(server):
    async def run():
        client, got, lost = await connect(server)
        await until(lambda: server.is_open("router-a"))
        for step in range(3):
            server.emit("router-a", "r1", [10 + step], None)
            server.emit("router-a", "r2", [20 + step], "length" if step == 2 else None)
            server.flush()
            await until(lambda: len(got) == step + 1)
        client.close()
        return got, lost

    got, lost = asyncio.run(run())
    assert [o.step for o in got] == [1, 2, 3]
    assert [[(d.request_id, d.token_ids, d.finish_reason) for d in o.deltas] for o in got][2] == [
        ("r1", [12], None), ("r2", [22], "length")]
    assert lost == []  # closing it ourselves is not a loss
    assert server.lost.event.wait(10) and server.lost.ids == ["router-a"]  # the worker saw it end


def test_a_slow_reader_gets_fewer_merged_messages_and_every_token(server):
    async def run():
        client, got, _ = await connect(server)
        await until(lambda: server.is_open("router-a"))
        client._transport.pause_reading()  # the router's loop is busy
        for tok in range(2000):
            server.emit("router-a", "r1", [tok], None)
            server.flush()
        server.emit("router-a", "r1", [], "stop")
        server.flush()
        await asyncio.sleep(0.3)
        client._transport.resume_reading()
        await until(lambda: got and got[-1].deltas[-1].finish_reason == "stop")
        client.close()
        return got

    got = asyncio.run(run())
    tokens = [t for o in got for d in o.deltas for t in d.token_ids]
    assert tokens == list(range(2000))
    assert len(got) < 2001  # several steps left as one message
    assert got[-1].step == 2001


def test_a_stranger_is_refused(server):
    good = server.issue("router-a")
    # a proof made without the ticket, for an issued stream id
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        nonce = msgpack.unpackb(sock.recv(4096))[0]
        sock.sendall(msgpack.packb(["router-a", channel_auth.prove(b"x" * 32, nonce, "router-a")]))
        assert sock.recv(4096) == b""  # closed on us
    # a proof made with a real ticket, for another stream id (a replay elsewhere)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        nonce = msgpack.unpackb(sock.recv(4096))[0]
        sock.sendall(msgpack.packb(["router-b", channel_auth.prove(good["ticket"], nonce, "router-b")]))
        assert sock.recv(4096) == b""
    # garbage
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.recv(4096)
        sock.sendall(b"\x93\x01\x02GET / HTTP/1.1\r\n\r\n")
        assert sock.recv(4096) == b""
    assert server.num_streams == 0
    server.emit("router-a", "r1", [1], None)
    server.flush()  # nobody to send to: dropped, nothing raised

    async def legit():  # a fresh ticket opens the stream; the same ticket again opens nothing
        info = server.issue("router-a")
        client = await StepStreamClient.connect(info["host"], info["port"], "router-a", info["ticket"],
                                                lambda _: None, lambda _: None)
        client.close()
        with pytest.raises(ConnectionError):  # a used ticket does not open a second stream
            await StepStreamClient.connect(info["host"], info["port"], "router-a", info["ticket"],
                                           lambda _: None, lambda _: None)

    asyncio.run(legit())


def test_a_worker_that_goes_silent_is_lost_within_the_timeout(server, monkeypatch):
    monkeypatch.setattr(step_stream, "SILENCE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(step_stream, "HEARTBEAT_S", 0.1)

    async def run():
        client, _, lost = await connect(server)
        await until(lambda: server.is_open("router-a"))
        await asyncio.sleep(1.0)
        assert lost == [] and client.is_open  # heartbeats keep an idle stream alive
        channel = next(iter(server._channels.values()))
        channel.cond.acquire()  # the worker hangs (its sender never gets its lock back): nothing is written
        try:
            await until(lambda: lost, 5.0)
        finally:
            channel.cond.release()
        return lost

    lost = asyncio.run(run())
    assert lost[0].startswith("no message for")


def test_a_worker_that_closes_fails_the_stream_at_once(server):
    async def run():
        _, _, lost = await connect(server)
        await until(lambda: server.is_open("router-a"))
        server.close()
        await until(lambda: lost, 5.0)
        return lost

    assert asyncio.run(run())[0].startswith("connection closed")


def test_the_stream_is_open_on_the_worker_once_the_router_has_its_ack(server):
    """A router calls generate() right after connect(): the worker must already know the stream
    (it registers the channel before it acknowledges; CI once saw the reverse order race)."""

    async def connect_many():
        for i in range(20):
            info = server.issue(f"router-{i}")
            client = await StepStreamClient.connect(info["host"], info["port"], f"router-{i}", info["ticket"],
                                                    lambda _: None, lambda _: None)
            assert server.is_open(f"router-{i}")
            client.close()

    asyncio.run(connect_many())
