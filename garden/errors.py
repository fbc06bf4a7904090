"""Domain errors: what went wrong, in the words of the job, with no transport in them.

Services raise these; only ``garden.api`` maps them to HTTP status codes (``api/errors.py``), and the CLI
prints their message. Level 0: anything may raise them.
"""

from __future__ import annotations


class GardenError(RuntimeError):
    """A request that cannot be done; the message says what and why, for the person who asked."""


class NotFound(GardenError):
    """What was asked for is not known here (a mission, an epoch nobody announces)."""


class Conflict(GardenError):
    """Not possible in the current state (a mission whose prompts have not arrived yet)."""


class NotAllowed(GardenError):
    """Only someone else may do this (only a mission's lead may cancel it)."""


class Refused(GardenError):
    """The request itself is wrong (a bad value the domain checks beyond the schema)."""


class Unavailable(GardenError):
    """This peer cannot do it now (still starting, busy); asking again later may work."""


class PeerFailed(GardenError):
    """Other peers were asked and did not deliver (unreachable, refused, or sent bad bytes)."""
