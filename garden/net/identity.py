"""The peer's persistent libp2p identity: an RSA key in the data dir, so the peer id survives restarts.

hivemind can generate the key itself, but writes it read-only (0400) and without an atomic
rename; a crash mid-write would leave a truncated key and a peer that cannot
start. This module writes it atomically with mode 0600 in hivemind's own format (a libp2p
``PrivateKey`` protobuf around a PKCS#1 DER key), then hands the path to hivemind.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.proto import crypto_pb2

from garden.protocol.signing import peer_id_of, public_key_der

logger = logging.getLogger(__name__)
KEY_BITS = 2048  # what hivemind and go-libp2p generate


class IdentityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Identity:
    path: Path
    private_key: rsa.RSAPrivateKey
    peer_id: str


def load_or_create_identity(path: Path) -> Identity:
    if not path.exists():
        _write_new_key(path)
        logger.info("created a new peer identity in %s", path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("identity %s was readable by others (mode %o); setting 0600", path, mode)
        path.chmod(0o600)
    try:
        proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        key = serialization.load_der_private_key(proto.data, password=None)
    except Exception as e:
        raise IdentityError(
            f"the identity file {path} is damaged ({e.__class__.__name__}); move it away to start with a new peer id"
        ) from None
    if proto.key_type != crypto_pb2.RSA or not isinstance(key, rsa.RSAPrivateKey):
        raise IdentityError(f"the identity file {path} holds a non-RSA key, which garden does not support")
    return Identity(path=path, private_key=key, peer_id=peer_id_of(public_key_der(key)))


def _write_new_key(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
