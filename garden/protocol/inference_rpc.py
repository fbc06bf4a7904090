"""The block-serving RPCs: what a client and a server say to each other over hivemind's P2P.

Four unary protocols, ``<swarm>.blocks.open``, ``.forward``, ``.close`` and ``.push``, on hivemind's existing
protobufs (as Petals uses them): the request is an ``ExpertRequest`` whose ``metadata`` is a msgpack
record below and whose ``tensors`` carry hidden states; the answer an ``ExpertResponse`` whose
``metadata`` is a :class:`Reply` and, for a forward step, whose one tensor is the output.

A decoding step may go along the chain without coming back to the client between servers: the client sends
every server of the chain its forward request at once; the first carries the hidden states and names the next
server's session (``push_peer``, ``push_session``, ``push_offset``), the others name the server whose ``push``
brings theirs (``pushed_by``) and how long to wait for it (``wait``). Each server sends its output on with a
``push`` and answers its client with the same output and a digest of the input it ran (``input_digest``), so
the client keeps every hop's input for fail-over and sees when a server pushed other states than it answered.

Hidden states travel as float16 by default (bfloat16 or float32 on request): half the bytes of float32,
and casting at the layer boundaries leaves greedy output unchanged on the built-in model (measured by
``benchmarks/pipeline.py``). Float16 is clamped to its range by hivemind's compression, never inf.

Every field a stranger sends is capped here, before any tensor is built: a forward step holds at most
``max_step_tokens`` tokens of ``hidden_size`` values, and hivemind's daemon connection refuses a unary
message over 4 MiB before it reaches us.
"""

from __future__ import annotations

from typing import Any, Literal

import msgpack
from pydantic import Field

from garden.protocol.records import RecordError, StrictRecord, decode_record

MAX_METADATA_BYTES = 2048
WireDtype = Literal["float16", "bfloat16", "float32"]
SessionId = str

# stable error codes (the client decides on them: fail over, give up, or tell the user)
ERROR_BAD_REQUEST = "bad request"  # malformed metadata or tensor: the client's bug
ERROR_NOT_SERVED = "not served"  # this server does not hold that model or those layers
ERROR_BUSY = "busy"  # max sessions reached, or not enough cache left
ERROR_TOO_LONG = "too long"  # the session would pass max_session_tokens
ERROR_UNKNOWN_SESSION = "unknown session"  # closed, expired (idle), or never opened here
ERROR_OUT_OF_SYNC = "out of sync"  # the client's idea of the cached length differs from the server's
ERROR_INTERNAL = "internal"  # the server failed running the layers
ERROR_NO_INPUT = "no input"  # a pushed step's hidden states did not come from the named server in time
ERROR_MISMATCH = "mismatch"  # (the client's verdict) a server ran other hidden states than the one before answered
MAX_PUSH_WAIT = 60.0
"""Longest a server holds a pushed step's request open waiting for its hidden states."""


class BlocksRpcError(RuntimeError):
    """An error answer from a server, or a failure to reach it.

    :ivar code: one of the ``ERROR_*`` codes, or ``"unreachable"`` / ``"timeout"``
    :ivar peer_id: the server
    """

    def __init__(self, peer_id: str, code: str, detail: str = "") -> None:
        super().__init__(f"server {peer_id}: {code}" + (f" ({detail})" if detail else ""))
        self.peer_id, self.code, self.detail = peer_id, code, detail

    @property
    def server_failed(self) -> bool:
        """Whether another server could do better (so the client should route around this one)."""
        return self.code not in (ERROR_BAD_REQUEST, ERROR_TOO_LONG)


class OpenRequest(StrictRecord):
    session: SessionId = Field(pattern="^[0-9a-f]{32}$")
    model: str = Field(min_length=1, max_length=256)
    start: int = Field(ge=0, le=1 << 16)
    end: int = Field(gt=0, le=1 << 16)
    max_tokens: int = Field(ge=1, le=1 << 24, description="the most tokens this session will hold")
    wire_dtype: WireDtype = "float16"


class ForwardRequest(StrictRecord):
    session: SessionId = Field(pattern="^[0-9a-f]{32}$")
    offset: int = Field(ge=0, le=1 << 24, description="tokens the client believes the session holds")
    push_peer: str = Field(default="", max_length=128, description="send the output on to this server, too")
    push_session: str = Field(default="", pattern="^([0-9a-f]{32})?$", description="...for this session of it")
    push_offset: int = Field(default=0, ge=0, le=1 << 24, description="...which holds this many tokens")
    pushed_by: str = Field(default="", max_length=128, description="the input comes by this server's push")
    wait: float = Field(default=0.0, ge=0.0, le=MAX_PUSH_WAIT, description="seconds to wait for that push")


class PushRequest(StrictRecord):
    """Hidden states one server sends the next server of a chain, for a step its client asked for."""

    session: SessionId = Field(pattern="^[0-9a-f]{32}$")
    offset: int = Field(ge=0, le=1 << 24, description="tokens the receiving session holds before the step")


class CloseRequest(StrictRecord):
    session: SessionId = Field(pattern="^[0-9a-f]{32}$")


class Reply(StrictRecord):
    ok: bool
    error: str = Field(default="", max_length=32)
    detail: str = Field(default="", max_length=500)
    tokens: int = Field(default=0, ge=0, description="tokens the session holds after this call")
    input_digest: str = Field(default="", max_length=64, description="of a pushed step's input (wire_digest)")


def pack(record: StrictRecord) -> bytes:
    packed: bytes = msgpack.packb(record.model_dump(mode="python"), use_bin_type=True)
    return packed


def unpack(model: type[Any], raw: bytes, what: str) -> Any:
    """Decode a record from a stranger; raises only ``RecordError``."""
    if len(raw) > MAX_METADATA_BYTES:
        raise RecordError(f"{what} is {len(raw)} bytes, over the {MAX_METADATA_BYTES}-byte cap")
    return decode_record(model, raw, what)


def serialize_hidden(hidden: Any, dtype: WireDtype) -> Any:
    """A ``runtime_pb2.Tensor`` of hidden states in the wire dtype."""
    import torch
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    if dtype == "float16":
        return serialize_torch_tensor(hidden, runtime_pb2.CompressionType.FLOAT16)
    if dtype == "bfloat16":  # 2 bytes a value (hivemind's own path sends bfloat16 as float32 by default)
        bits = hidden.detach().to(torch.bfloat16).contiguous().view(torch.int16)
        return runtime_pb2.Tensor(
            compression=runtime_pb2.CompressionType.NONE, buffer=bits.numpy().tobytes(), size=hidden.shape,
            dtype="bfloat16",
        )  # fmt: skip
    return serialize_torch_tensor(hidden.float(), runtime_pb2.CompressionType.NONE)


def wire_digest(proto: Any) -> str:
    """What identifies a tensor's bytes on the wire: a pushed step's server and its client compare it."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{list(proto.size)}:{proto.dtype}:{proto.compression}:".encode())
    digest.update(proto.buffer)
    return digest.hexdigest()


def deserialize_hidden(proto: Any, hidden_size: int, max_tokens: int) -> Any:
    """Float32 hidden states ``[1, tokens, hidden_size]`` from a stranger's tensor; ``RecordError`` if the
    shape is not that, the tokens exceed ``max_tokens``, the bytes do not match, or a value is not finite."""
    import torch
    from hivemind.compression import deserialize_torch_tensor

    shape = list(proto.size)
    if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden_size or not 1 <= shape[1] <= max_tokens:
        raise RecordError(f"hidden states of shape {shape[:8]}, expected [1, 1..{max_tokens}, {hidden_size}]")
    try:
        tensor = deserialize_torch_tensor(proto)
    except Exception as e:  # noqa: BLE001 - any decoding failure of a stranger's bytes is a bad request
        raise RecordError(f"undecodable tensor: {type(e).__name__}: {str(e)[:160]}") from None
    if list(tensor.shape) != shape:
        raise RecordError(f"tensor holds {list(tensor.shape)}, announces {shape}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise RecordError("hidden states hold non-finite values")
    return tensor
