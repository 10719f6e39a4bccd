"""Pair authentication of the rendezvous transports (gloo, shm, nccl).

A stranger who reaches a pair's port on the private network first, claiming a sender's id, or an
impostor at a receiver's address, must never send or receive a byte of KV. Each receiver
incarnation draws a secret; the key of its pair with sender S is an HMAC of S under it
(``pair_key``), handed to S in its pair info through Ray (``prepare_pair``), never on a socket the
pair opens. Every new communicator runs ``authenticate`` before its first header.
"""

from __future__ import annotations

from cluster import channel_auth

from .base import KVTransferError

PAIR_KEY_BYTES = 32


class KVPeerRefused(KVTransferError):
    """The other end of a new pair could not prove it holds the pair's key: a stranger on the
    network, or a peer of another cluster or incarnation. Nothing was sent or accepted."""


def pair_key(receiver_secret: bytes, sender_id: str) -> bytes:
    """The key of the pair (this receiver incarnation, ``sender_id``): handed to the sender in its
    pair info, through Ray; never on a socket the pair opens."""
    return channel_auth.prove(receiver_secret, b"tessera-kv-pair-key", sender_id)


def authenticate(exchange, key: bytes, is_sender: bool, sender_id: str, receiver_id: str, epoch: int,
                 transfer_id: str) -> None:
    """Mutual proof over a new communicator, before any KV moves: each end sends a fresh nonce,
    then an HMAC of both nonces under the pair key, bound to its role, the pair and the epoch (so
    an answer cannot be reflected, replayed, or used on another pair). ``exchange(data)`` sends
    32 bytes and returns the peer's 32 (the sender sends first, for transports that need an
    order). KVPeerRefused when the peer's proof is wrong."""
    context = f"{sender_id}\0{receiver_id}\0{epoch}"
    roles = ("sender", "receiver") if is_sender else ("receiver", "sender")
    nonce = channel_auth.new_nonce()
    peer_nonce = exchange(nonce)
    proof = exchange(channel_auth.prove(key, peer_nonce + nonce, f"{roles[0]}\0{context}"))
    if not channel_auth.verify(key, nonce + peer_nonce, f"{roles[1]}\0{context}", proof):
        raise KVPeerRefused(f"the {roles[1]} of pair {sender_id} -> {receiver_id} failed authentication "
                            "(not holding the pair's key): refused, nothing sent or accepted", transfer_id=transfer_id)
