"""A small ctypes binding over libnccl.so.2: just what the KV transport uses.

The library is found, in order, at ``$TESSERA_NCCL_LIBRARY``, in the ``nvidia-nccl-cu12`` wheel
(``nvidia/nccl/lib/libnccl.so.2`` under any sys.path entry), then by the system loader. Importing
this module never loads it; `load_nccl()` does and raises `NcclUnavailable` with the reason.

Signatures follow nccl.h (NCCL >= 2.14 for the nonblocking config; tested against 2.32 headers)::

    ncclResult_t ncclGetVersion(int* version);
    ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);               // 128 opaque bytes
    ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
    ncclResult_t ncclCommInitRankConfig(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*);
    ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t, cudaStream_t);
    ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t, cudaStream_t);
    ncclResult_t ncclGroupStart(void);  ncclResult_t ncclGroupEnd(void);
    ncclResult_t ncclCommAbort(ncclComm_t);  ncclResult_t ncclCommDestroy(ncclComm_t);
    ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* asyncError);
    const char*  ncclGetErrorString(ncclResult_t);  const char* ncclGetLastError(ncclComm_t);
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import torch

NCCL_LIBRARY_ENV = "TESSERA_NCCL_LIBRARY"
_WHEEL_RELPATH = Path("nvidia") / "nccl" / "lib" / "libnccl.so.2"

# ncclResult_t
NCCL_SUCCESS = 0
NCCL_UNHANDLED_CUDA_ERROR = 1
NCCL_SYSTEM_ERROR = 2
NCCL_INTERNAL_ERROR = 3
NCCL_INVALID_ARGUMENT = 4
NCCL_INVALID_USAGE = 5
NCCL_REMOTE_ERROR = 6
NCCL_IN_PROGRESS = 7

# ncclDataType_t for the dtypes a KV cache (and our small control tensors) can have.
NCCL_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}

NCCL_UNIQUE_ID_BYTES = 128
_NCCL_API_MAGIC = 0xCAFEBEEF
_NCCL_CONFIG_UNDEF_INT = -(2**31)  # INT_MIN
_CONFIG_ABI_VERSION = 21400  # NCCL_VERSION(2, 14, 0): the ncclConfig_v21400 layout below


def nccl_version_code(major: int, minor: int, patch: int) -> int:
    """NCCL_VERSION(X, Y, Z) from nccl.h."""
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


class NcclConfigV21400(ctypes.Structure):
    """ncclConfig_v21400. NCCL reads only the fields `version` declares, so this prefix of
    newer layouts is accepted by every NCCL >= 2.14. `cga_cluster_size` fills what was tail
    padding in 2.14 (and is cgaClusterSize in later layouts): left undefined."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cga_cluster_size", ctypes.c_int),
    ]


class NcclUnavailable(RuntimeError):
    """libnccl.so.2 cannot be found or loaded (or is too old)."""


class NcclError(RuntimeError):
    def __init__(self, code: int, what: str, detail: str = ""):
        super().__init__(f"{what} failed: NCCL error {code}" + (f" ({detail})" if detail else ""))
        self.code = code


def find_nccl_library() -> str:
    """Path (or soname) to load; see the module docstring for the order."""
    override = os.environ.get(NCCL_LIBRARY_ENV)
    if override:
        return override
    for entry in sys.path:
        candidate = Path(entry or ".") / _WHEEL_RELPATH
        if candidate.is_file():
            return str(candidate)
    return "libnccl.so.2"


class NcclLibrary:
    """Typed wrappers; each raises NcclError unless the call returned success (or in-progress,
    for the calls that may return it on a nonblocking communicator)."""

    def __init__(self, path: str):
        try:
            self._lib = lib = ctypes.CDLL(path)
        except OSError as e:
            raise NcclUnavailable(
                f"cannot load NCCL from {path!r} ({e}); install the 'gpu' extra (nvidia-nccl-cu12) "
                f"or set {NCCL_LIBRARY_ENV} to libnccl.so.2"
            ) from e
        self.path = path
        c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        comm_p = ctypes.POINTER(c_void_p)
        signatures = {
            "ncclGetVersion": (c_int, [ctypes.POINTER(c_int)]),
            "ncclGetUniqueId": (c_int, [ctypes.POINTER(NcclUniqueId)]),
            "ncclCommInitRank": (c_int, [comm_p, c_int, NcclUniqueId, c_int]),
            "ncclSend": (c_int, [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]),
            "ncclRecv": (c_int, [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]),
            "ncclGroupStart": (c_int, []),
            "ncclGroupEnd": (c_int, []),
            "ncclCommAbort": (c_int, [c_void_p]),
            "ncclCommDestroy": (c_int, [c_void_p]),
            "ncclCommGetAsyncError": (c_int, [c_void_p, ctypes.POINTER(c_int)]),
            "ncclGetErrorString": (ctypes.c_char_p, [c_int]),
        }
        optional = {
            "ncclCommInitRankConfig": (c_int, [comm_p, c_int, NcclUniqueId, c_int, ctypes.POINTER(NcclConfigV21400)]),
            "ncclGetLastError": (ctypes.c_char_p, [c_void_p]),
        }
        for name, (restype, argtypes) in {**signatures, **optional}.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as e:
                if name in optional:
                    continue
                raise NcclUnavailable(f"{path} has no {name}: too old an NCCL") from e
            fn.restype, fn.argtypes = restype, argtypes
        self.has_config = hasattr(lib, "ncclCommInitRankConfig")
        self.version = self.get_version()

    # -- errors ----------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        s = self._lib.ncclGetErrorString(code)
        return s.decode() if s else f"error {code}"

    def last_error(self, comm: int | None = None) -> str:
        if not hasattr(self._lib, "ncclGetLastError"):
            return ""
        s = self._lib.ncclGetLastError(comm)
        return s.decode(errors="replace") if s else ""

    def check(self, code: int, what: str, comm: int | None = None, *, allow_in_progress: bool = False) -> int:
        if code == NCCL_SUCCESS or (allow_in_progress and code == NCCL_IN_PROGRESS):
            return code
        detail = self.error_string(code)
        last = self.last_error(comm)
        raise NcclError(code, what, f"{detail}; {last}" if last else detail)

    # -- calls -----------------------------------------------------------------------------
    def get_version(self) -> int:
        v = ctypes.c_int()
        self.check(self._lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    def get_unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self.check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int, *, blocking: bool = True) -> tuple[int, int]:
        """(comm handle, result). Nonblocking: result may be NCCL_IN_PROGRESS; poll
        `comm_get_async_error` until success before using the comm. Uses the current device."""
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"NCCL unique id must be {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        uid = NcclUniqueId()
        ctypes.memmove(ctypes.addressof(uid), unique_id, NCCL_UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        if blocking or not self.has_config:
            code = self._lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank)
            self.check(code, "ncclCommInitRank")
            return comm.value or 0, code
        config = NcclConfigV21400(
            size=ctypes.sizeof(NcclConfigV21400),
            magic=_NCCL_API_MAGIC,
            version=_CONFIG_ABI_VERSION,
            blocking=0,
            cga_cluster_size=_NCCL_CONFIG_UNDEF_INT,
        )
        code = self._lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, uid, rank, ctypes.byref(config))
        if code not in (NCCL_SUCCESS, NCCL_IN_PROGRESS) and comm.value:
            self._lib.ncclCommAbort(comm)
        self.check(code, "ncclCommInitRankConfig", allow_in_progress=True)
        return comm.value or 0, code

    def send(self, comm: int, ptr: int, count: int, dtype: torch.dtype, peer: int, stream: int) -> int:
        code = self._lib.ncclSend(ptr, count, NCCL_DTYPES[dtype], peer, comm, stream)
        return self.check(code, "ncclSend", comm, allow_in_progress=True)

    def recv(self, comm: int, ptr: int, count: int, dtype: torch.dtype, peer: int, stream: int) -> int:
        code = self._lib.ncclRecv(ptr, count, NCCL_DTYPES[dtype], peer, comm, stream)
        return self.check(code, "ncclRecv", comm, allow_in_progress=True)

    def group_start(self) -> None:
        self.check(self._lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> int:
        return self.check(self._lib.ncclGroupEnd(), "ncclGroupEnd", allow_in_progress=True)

    def comm_get_async_error(self, comm: int) -> int:
        """The comm's state: NCCL_SUCCESS, NCCL_IN_PROGRESS, or the asynchronous error code."""
        state = ctypes.c_int()
        self.check(self._lib.ncclCommGetAsyncError(comm, ctypes.byref(state)), "ncclCommGetAsyncError", comm)
        return state.value

    def comm_abort(self, comm: int) -> int:
        return self._lib.ncclCommAbort(comm)

    def comm_destroy(self, comm: int) -> int:
        return self._lib.ncclCommDestroy(comm)


_loaded: dict[str, NcclLibrary] = {}
_load_lock = threading.Lock()


def load_nccl(path: str | None = None) -> NcclLibrary:
    """The NCCL binding (loaded once per path). Raises NcclUnavailable with the reason."""
    path = path or find_nccl_library()
    with _load_lock:
        if path not in _loaded:
            _loaded[path] = NcclLibrary(path)
        return _loaded[path]
