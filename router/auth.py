"""API-key checks shared by every front door (gRPC metadata, HTTP headers).

A caller presents ``authorization: Bearer <key>``; ``router.api_keys`` lists the keys accepted
(empty: no authentication). The presented key is compared with *every* configured key in
constant time (``hmac.compare_digest``), so neither the result nor the time taken tells a caller
how much of a key matched or which key it was close to.

    if not is_authorized(header_value, config.router.api_keys):
        ...  # gRPC: UNAUTHENTICATED, HTTP: 401 with WWW-Authenticate: Bearer
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

AUTH_HEADER = "authorization"  # gRPC metadata keys are lower case; HTTP headers match case-insensitively
UNAUTHENTICATED_MESSAGE = "this call needs an API key: send `authorization: Bearer <key>`"


def bearer_token(header_value: str | None) -> str | None:
    """The key in ``Bearer <key>`` (scheme case-insensitive), or None if absent or malformed."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def is_authorized(header_value: str | None, api_keys: Sequence[str]) -> bool:
    """True if no keys are configured, or the header carries one of them."""
    if not api_keys:
        return True
    token = bearer_token(header_value)
    if token is None:
        return False
    presented = token.encode()
    matched = False
    for key in api_keys:  # no early exit: every key is compared
        matched |= hmac.compare_digest(presented, key.encode())
    return matched


def grpc_metadata_value(context, key: str = AUTH_HEADER) -> str | None:
    """The first value of ``key`` in a gRPC call's invocation metadata (None if absent)."""
    for item in context.invocation_metadata() or ():
        if item.key.lower() == key:
            value = item.value
            return value.decode() if isinstance(value, bytes) else value
    return None
