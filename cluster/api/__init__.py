"""Generated Python stubs of the public gRPC API (`tessera.v1`).

The sources are in proto/tessera/v1/tessera.proto; regenerate with `python proto/generate.py`
(never edit tessera_pb2*.py by hand).

    from cluster.api import tessera_pb2, tessera_pb2_grpc
"""

from . import tessera_pb2, tessera_pb2_grpc

__all__ = ["tessera_pb2", "tessera_pb2_grpc"]
