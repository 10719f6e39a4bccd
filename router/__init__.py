"""The front door: request validation and preparation, routing policies, admission control, and
the request driver (``router.core``), behind a thin gRPC servicer (``router.grpc_server``) and a
thin OpenAI-compatible HTTP app (``router.http_server``).

    events.py           the transport-neutral request, events and errors
    core.py             RouterCore: drives one request through encoder -> prefill -> decode
    policies.py         which worker of a pool gets a request
    admission.py        bounded in-flight requests + bounded queue
    metrics.py          Prometheus registry: request outcomes/timings, per-worker gauges
    grpc_server.py      tessera.v1 servicer, health, reflection
    http_server.py      OpenAI-compatible routes (FastAPI on uvicorn), /health, /metrics
    openai_protocol.py  OpenAI request/response models and their translation to GenerateInput
    media_urls.py       image_url / input_audio parts -> media bytes (data: URIs; allow-listed URLs)
    service.py          running core + servers next to a launched cluster
"""
