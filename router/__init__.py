"""The front door: request validation and preparation, routing policies, admission control, and
the request driver (``router.core``), behind a thin gRPC servicer (``router.grpc_server``).

    events.py       the transport-neutral request, events and errors
    core.py         RouterCore: drives one request through encoder -> prefill -> decode
    policies.py     which worker of a pool gets a request
    admission.py    bounded in-flight requests + bounded queue
    grpc_server.py  tessera.v1 servicer, health, reflection
    service.py      running core + server next to a launched cluster
"""
