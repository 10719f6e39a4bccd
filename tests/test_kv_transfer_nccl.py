"""NCCL KV transport: import hygiene and the binding on CPU; real transfers on GPUs (marked gpu).

Point TESSERA_NCCL_LIBRARY at a libnccl.so.2 to run the binding test on a CPU-only machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict

import pytest
import torch

from cluster.kv_transfer import KVTicket, KVTransferError, KVTransferTimeout
from cluster.kv_transfer.nccl_lib import (
    NCCL_DTYPES,
    NCCL_IN_PROGRESS,
    NCCL_INVALID_ARGUMENT,
    NcclError,
    NcclUnavailable,
    load_nccl,
    nccl_version_code,
)
from cluster.kv_transfer.testing import CacheSpec, EndpointProcess, KVEndpoint, assert_blocks_landed, make_meta

SENDER_ID = "prefill-0"
RECEIVER_ID = "decode-0"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (clean sys.modules), failing the test on error."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def nccl_library():
    try:
        return load_nccl()
    except NcclUnavailable:
        return None


# -- CPU ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_gloo_and_ray_endpoints_never_import_nccl():
    run_python("""
        import sys
        from cluster.kv_transfer import make_kv_receiver, make_kv_sender
        receiver = make_kv_receiver("gloo", receiver_id="d")
        make_kv_sender("gloo", sender_id="p").connect("d", receiver.prepare_pair("p"))
        make_kv_sender("ray", sender_id="p")
        loaded = [m for m in sys.modules if m.startswith("cluster.kv_transfer.nccl")]
        assert not loaded, loaded
    """)


@pytest.mark.timeout(120)
def test_nccl_module_imports_without_cuda_or_nccl_and_fails_clearly_on_use():
    proc = run_python("""
        import cluster.kv_transfer.nccl  # must import with neither CUDA nor NCCL
        from cluster.kv_transfer import KVTransferError, make_kv_sender
        from cluster.kv_transfer.nccl_lib import NcclUnavailable, load_nccl
        try:
            load_nccl()
        except NcclUnavailable as e:
            print("LOAD:", e)
        else:
            raise AssertionError("loaded a library that does not exist")
        try:
            make_kv_sender("nccl", sender_id="p")
        except KVTransferError as e:
            print("USE:", e)
        else:
            raise AssertionError("made an nccl sender without NCCL")
    """, TESSERA_NCCL_LIBRARY="/nonexistent/libnccl.so.2")
    assert "TESSERA_NCCL_LIBRARY" in proc.stdout and "nvidia-nccl-cu12" in proc.stdout
    use = proc.stdout.split("USE:")[1]
    assert "CUDA" in use or "unavailable" in use


@pytest.mark.timeout(60)
def test_nccl_binding_calls_that_need_no_gpu():
    lib = nccl_library()
    if lib is None:
        pytest.skip("libnccl.so.2 not found (install nvidia-nccl-cu12 or set TESSERA_NCCL_LIBRARY)")
    assert lib.version >= nccl_version_code(2, 14, 0) and lib.has_config
    a, b = lib.get_unique_id(), lib.get_unique_id()
    assert len(a) == len(b) == 128 and a != b
    assert "progress" in lib.error_string(NCCL_IN_PROGRESS).lower()
    assert NCCL_DTYPES[torch.bfloat16] == 9 and NCCL_DTYPES[torch.float32] == 7
    if not torch.cuda.is_available():
        with pytest.raises(NcclError) as info:  # fails cleanly (a CUDA error), does not crash
            lib.comm_init_rank(2, a, 0, blocking=False)
        assert info.value.code != NCCL_INVALID_ARGUMENT


# -- GPU ---------------------------------------------------------------------------------------

def needs_nccl_gpu(test):
    test = pytest.mark.gpu(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.skipif(nccl_library() is None, reason="libnccl.so.2 not found")(test)


def gpu_pair_devices() -> tuple[str, str]:
    """(receiver, sender) devices. NCCL does not support two ranks of one communicator on the
    same GPU (it may refuse or hang), so these tests need two."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: NCCL does not support both ranks of a pair on one GPU")
    return "cuda:0", "cuda:1"


class NcclPair:
    """Receiver here (GPU 0), sender in a child process (GPU 1)."""

    def __init__(self, dtype: str, **spec):
        receiver_dev, sender_dev = gpu_pair_devices()
        self.send_spec = CacheSpec(dtype=dtype, device=sender_dev, seed=0, **spec)
        self.recv_spec = CacheSpec(dtype=dtype, device=receiver_dev, seed=1, **spec)
        self.receiver = KVEndpoint("receiver", "nccl", RECEIVER_ID, asdict(self.recv_spec), device=receiver_dev,
                                   timeout_s=60.0)
        self.sender = EndpointProcess("sender", "nccl", SENDER_ID, self.send_spec, device=sender_dev, timeout_s=60.0)
        assert self.sender.call("connect", peer_id=RECEIVER_ID, info=self.receiver.pair_info(SENDER_ID))["ok"]

    def transfer(self, meta, recv_timeout_s: float = 60.0):
        self.sender.request("send", peer_id=RECEIVER_ID, meta=meta)
        try:
            got = self.receiver.recv(KVTicket("nccl", SENDER_ID, RECEIVER_ID, meta), recv_timeout_s)
        except KVTransferError as e:
            reply = self.sender.reply(120.0)
            raise AssertionError(f"recv failed: {e}; sender: {reply}") from e
        reply = self.sender.reply(120.0)
        assert reply["ok"], reply
        return got, reply

    def close(self):
        self.sender.close()
        self.receiver.close()


@pytest.fixture
def nccl_pair(request):
    pair = NcclPair(**request.param)
    yield pair
    pair.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nccl_pair", [{"dtype": "float32"}, {"dtype": "bfloat16"}], indirect=True)
@needs_nccl_gpu
def test_nccl_two_processes_move_blocks_exactly(nccl_pair):
    src, dst = (3, 17, 5, 30, 0), (9, 1, 22, 14, 27)
    before = nccl_pair.receiver.kv.clone()
    for i in range(2):  # the second transfer reuses the pair
        meta = make_meta(nccl_pair.send_spec, f"t-nccl-{i}", src, dst)
        got, reply = nccl_pair.transfer(meta)
        assert got == reply["num_bytes"] == meta.num_bytes
    assert_blocks_landed(nccl_pair.send_spec.make(), nccl_pair.receiver.kv, before, src, dst)
    assert nccl_pair.receiver.stats()["num_pair_setups"] == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nccl_pair", [{"dtype": "bfloat16"}], indirect=True)
@needs_nccl_gpu
def test_nccl_recv_without_sender_times_out_then_recovers(nccl_pair):
    src, dst = (1, 2, 3), (4, 5, 6)
    nccl_pair.transfer(make_meta(nccl_pair.send_spec, "t-warm", src, dst))  # builds the pair
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout):
        nccl_pair.receiver.recv(KVTicket("nccl", SENDER_ID, RECEIVER_ID,
                                         make_meta(nccl_pair.send_spec, "t-nobody", src, dst)), 1.0)
    assert time.monotonic() - t0 < 3.0
    got, _ = nccl_pair.transfer(make_meta(nccl_pair.send_spec, "t-after", src, dst))
    assert got > 0


# A layer of a 7B-class model at 1k tokens: 2 x 64 blocks x 16 tokens x 8 heads x 128 dims, bf16
# = 4 MiB per layer, 32 layers = 128 MiB per transfer.
BANDWIDTH_SPEC = dict(num_layers=32, num_blocks=80, block_size=16, num_kv_heads=8, head_dim=128)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nccl_pair", [{"dtype": "bfloat16", **BANDWIDTH_SPEC}], indirect=True)
@needs_nccl_gpu
def test_nccl_bandwidth(nccl_pair):
    blocks = tuple(range(64))
    meta0 = make_meta(nccl_pair.send_spec, "t-bw-warm", blocks, blocks)
    nccl_pair.transfer(meta0)  # pair setup and connection warm-up, not timed
    recv_s, send_s = [], []
    for i in range(5):
        meta = make_meta(nccl_pair.send_spec, f"t-bw-{i}", blocks, blocks)
        t0 = time.perf_counter()
        _, reply = nccl_pair.transfer(meta)
        recv_s.append(time.perf_counter() - t0)
        send_s.append(reply["elapsed_s"])
    size = meta0.num_bytes
    best = min(send_s)
    print(f"\nnccl KV transfer {nccl_pair.recv_spec.device}<-{nccl_pair.send_spec.device}: "
          f"{size / 2**20:.0f} MiB, send best {best * 1e3:.1f} ms = {size / best / 1e9:.2f} GB/s, "
          f"recv median {sorted(recv_s)[2] * 1e3:.1f} ms (includes the command round trip)")
    assert_blocks_landed(nccl_pair.send_spec.make(), nccl_pair.receiver.kv, nccl_pair.recv_spec.make(),
                         blocks, blocks)
