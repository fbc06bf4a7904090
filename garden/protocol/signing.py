"""Signatures by a peer's own libp2p identity key.

A peer id is the multihash of the peer's public key, so a record signed with the identity key and
carrying that public key proves who wrote it: a peer cannot publish a record under another peer's
id. This is the same RSA key the p2p daemon uses (hivemind generates 2048-bit RSA identities).
"""

from __future__ import annotations

import hashlib

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_PADDING = padding.PKCS1v15()
_HASH = hashes.SHA256()
MAX_PUBLIC_KEY_BYTES = 1024  # DER of a 4096-bit RSA key is ~550 bytes


def public_key_der(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )


def peer_id_of(public_der: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key: base58(multihash(sha256(PublicKey protobuf))).

    Encoded by hand rather than through ``hivemind.p2p.PeerID``: importing hivemind imports torch
    (~3 s), and ``garden status`` must not pay that. tests/protocol checks it against hivemind.
    """
    # libp2p crypto.pb PublicKey {Type = 1 (varint, RSA = 0); Data = 2 (bytes)}
    encoded = b"\x08\x00\x12" + _varint(len(public_der)) + public_der
    multihash = b"\x12\x20" + hashlib.sha256(encoded).digest()  # sha2-256, 32 bytes
    return base58.b58encode(multihash).decode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sign(private_key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return private_key.sign(data, _PADDING, _HASH)


def verify(public_der: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` over ``data`` is valid for this DER public key; never raises."""
    if len(public_der) > MAX_PUBLIC_KEY_BYTES:
        return False
    try:
        key = serialization.load_der_public_key(public_der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, _PADDING, _HASH)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
