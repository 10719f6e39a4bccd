"""Proof that the peer on a socket the project opens was sent by the cluster, without the secret
ever crossing that socket.

A *ticket* (32 random bytes) is handed to the connecting side through Ray, whose channels are
authenticated (Ray's token auth) and never leave the cluster. The listening side then proves
nothing but checks the connecting side::

    listener                                     connector (holds the ticket, from Ray)
       │── challenge: 32 random bytes (nonce) ──────▶│
       │◀── (channel id, HMAC-SHA256(ticket, nonce ‖ channel id)) ──│
       │ constant-time compare against the ticket issued for that channel id

A stranger who reaches the port (anyone on the private network) has no ticket and is refused;
one who records a handshake cannot replay it (the next nonce differs). Used by the decode and
colocated workers' token streams (``cluster.step_stream``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TICKET_BYTES = 32
NONCE_BYTES = 32


def new_ticket() -> bytes:
    return secrets.token_bytes(TICKET_BYTES)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def prove(ticket: bytes, nonce: bytes, channel_id: str) -> bytes:
    """The connector's answer to ``nonce`` for ``channel_id``."""
    return hmac.new(ticket, nonce + channel_id.encode(), hashlib.sha256).digest()


def verify(ticket: bytes, nonce: bytes, channel_id: str, proof: bytes) -> bool:
    """Constant time: neither the result nor the time taken tells a stranger anything."""
    return hmac.compare_digest(prove(ticket, nonce, channel_id), proof)
