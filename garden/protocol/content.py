"""Content references and the framing of content transfer: what a peer asks another for, and the short
messages around the bytes (see ``garden.net.transfer`` for the streams that carry them).

A :class:`ContentRef` names content by what it is (for the holder's lookup) and by its sha256 (for the
fetcher's check): the fetcher always knows the hash beforehand, from a record someone signed, so the
transfer layer moves bytes and checks them without understanding them.
"""

from __future__ import annotations

from typing import Literal

import msgpack
from pydantic import Field

from garden.protocol.mission import MissionId
from garden.protocol.records import RecordError, StrictRecord, decode_record
from garden.protocol.shards import Sha256Hex

ContentKind = Literal["prompts", "rows", "ckpt"]
MAX_REF_BYTES = 1024
"""Cap on an encoded :class:`ContentRef` (~200 bytes): a bigger request is garbage."""
MAX_HEADER_BYTES = 1024
"""Cap on the first answer message (a msgpack map of one short field)."""
CHUNK_SLACK_BYTES = 64
"""Protobuf framing around a chunk in ``ExpertResponse.metadata`` (a tag and a length varint)."""
ERROR_NOT_HELD = "not held"
ERROR_BUSY = "busy"
ERROR_BAD_REQUEST = "bad request"
ERROR_SOURCE_FAILED = "source failed"


class ContentRef(StrictRecord):
    """Names content by what it is (for the holder's lookup) and by its sha256 (for the fetcher's check)."""

    kind: ContentKind
    mission_id: MissionId
    item: str = Field(
        default="", max_length=160,
        description='for rows the row-set name, "<shard>:<attempt>"; for ckpt "<epoch>/<model|adapter>/<file>"',
    )  # fmt: skip
    sha256: Sha256Hex

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, raw: bytes) -> ContentRef:
        """Decode a ref from a stranger; raises only ``RecordError``."""
        if len(raw) > MAX_REF_BYTES:
            raise RecordError(f"content ref is {len(raw)} bytes, over the {MAX_REF_BYTES}-byte cap")
        return decode_record(cls, raw, "content ref")

    def __str__(self) -> str:
        item = f" {self.item}" if self.item else ""
        return f"{self.kind}{item} of mission {self.mission_id[:12]} (sha256 {self.sha256[:12]})"


class ContentHeader(StrictRecord):
    """The first message of a fetch's answer: the content's size, or why it is not sent."""

    total: int | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=200)


class OfferReply(StrictRecord):
    """The answer to an offer: fetched and stored, or refused with a reason."""

    ok: bool
    reason: str = Field(default="", max_length=200)
