"""The invite line: everything a new gardener needs to join a swarm, in one string to paste.

``garden invite`` prints it on a running peer; ``garden run --join <line>`` takes it wherever it takes a
multiaddr. It holds the swarm's name, a few bootstrap addresses (several peers: one that is gone does not stop a
newcomer), and optionally leads the inviter asks the newcomer to trust (its ``--trust-lead``: pasting the line is
that consent). ``garden-invite:`` then base64url of a msgpack map (``s``: the swarm, ``p``: the addresses in
multiaddr's binary form, ``l``: the leads' peer ids as bytes; about 65 characters a peer): no spaces, no commas,
safe in a shell, a chat message or a config file. It carries no secret: anyone who has it can join, as with any
bootstrap address.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

import msgpack
from pydantic import Field, StringConstraints, ValidationError

from garden.protocol.records import RecordError, StrictRecord, decode_record

INVITE_PREFIX = "garden-invite:"
MAX_INVITE_CHARS = 4096
MAX_INVITE_PEERS = 8
PEER_ID = r"[1-9A-HJ-NP-Za-km-z]{30,80}"
PEER_MADDR = rf"/(ip4|ip6|dns4|dns6|dns)/[^/\s,]+/tcp/\d+(/p2p/{PEER_ID}/p2p-circuit)?/p2p/{PEER_ID}"
"""A peer's address to dial: host, TCP port, peer id; or behind a relay (``.../p2p/<relay>/p2p-circuit``)."""


class Invite(StrictRecord):
    """:param swarm: the swarm's name (``--swarm``)
    :param peers: bootstrap multiaddrs, each ending in ``/p2p/<peer id>``
    :param leads: peer ids the newcomer will trust as mission leads (``--trust-lead``)"""

    v: int = Field(1, ge=1, le=1)
    swarm: str = Field(min_length=1, max_length=64)
    peers: list[Annotated[str, StringConstraints(pattern=f"^{PEER_MADDR}$", max_length=400)]] = Field(
        min_length=1, max_length=MAX_INVITE_PEERS
    )
    leads: list[Annotated[str, StringConstraints(pattern=f"^{PEER_ID}$")]] = Field(
        default_factory=list, max_length=MAX_INVITE_PEERS
    )

    def line(self) -> str:
        from hivemind.p2p import PeerID  # here: hivemind takes a second to import, and every command reads config
        from hivemind.utils.multiaddr import Multiaddr

        compact = {
            "v": self.v, "s": self.swarm, "p": [Multiaddr(p).to_bytes() for p in self.peers],
            "l": [PeerID.from_base58(lead).to_bytes() for lead in self.leads],
        }  # fmt: skip
        packed = msgpack.packb(compact, use_bin_type=True)
        return INVITE_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")


class _Compact(StrictRecord):
    v: int = Field(ge=1, le=1)
    s: str = Field(max_length=64)
    p: list[Annotated[bytes, Field(max_length=200)]] = Field(max_length=MAX_INVITE_PEERS)
    l: list[Annotated[bytes, Field(max_length=64)]] = Field(default_factory=list, max_length=MAX_INVITE_PEERS)  # noqa: E741


def is_invite(text: str) -> bool:
    return text.strip().startswith(INVITE_PREFIX)


def parse_invite(text: str) -> Invite:
    """The invite in ``text``; raises ``ValueError`` saying what is wrong with it (cut short, pasted twice...)."""
    body = text.strip()[len(INVITE_PREFIX) :]
    if len(body) > MAX_INVITE_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise ValueError("the invite line is damaged: copy the whole line `garden invite` printed, and only it")
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        compact = decode_record(_Compact, raw, "invite")
        return Invite(
            v=compact.v, swarm=compact.s, peers=[str(Multiaddr(p)) for p in compact.p],
            leads=[PeerID(lead).to_base58() for lead in compact.l],
        )  # fmt: skip
    except (binascii.Error, RecordError, ValidationError, ValueError, TypeError) as e:
        why = str(e).splitlines()[0][:200]
        raise ValueError(f"the invite line is damaged ({why}): copy the whole line `garden invite` printed") from None
