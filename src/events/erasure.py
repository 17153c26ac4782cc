"""Scrubbing personal data out of the event rows that outlive an erased account.

The outbox and the audit trail keep a user's events after ``user-service users erase`` (counts
and order survive), with every personal field replaced. Both the erasure itself
(``src.users.privacy``) and the audit consumer use this: the consumer may store a user's older
events after the erasure ran (it lags behind the topic), and scrubs them when ``user.erased``
arrives, which comes after them in the user's partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What replaces each personal field in the rows kept after an erasure. Each replacement is still
# valid for the event's schema (docs/events/), so an event erased before it was published is
# published as a well-formed event: ".invalid" is a top-level domain reserved never to resolve
# (RFC 2606), "unknown" is what ``ip`` says when the peer was not an IP address.
ERASED_EMAIL = "erased@erased.invalid"
ERASED_TEXT = "[erased]"
REPLACEMENTS: dict[str, str | None] = {
    "email": ERASED_EMAIL,
    "previous_email": ERASED_EMAIL,
    "new_email": ERASED_EMAIL,
    "full_name": None,
    "ip": "unknown",
    "user_agent": None,
    # A second factor's name is the user's own words ("Ada's phone").
    "name": "erased",
}
# Text shorter than this is not looked for inside other values: a two-letter name would erase
# every word containing it.
_MIN_SEARCHED_LENGTH = 4


def personal_values(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in REPLACEMENTS and isinstance(item, str):
                yield item
            else:
                yield from personal_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from personal_values(item)


def scrub(value: Any, personal: list[str]) -> Any:
    """``value`` with its personal fields replaced (``REPLACEMENTS``), and any other text that
    contains personal text (an address quoted in a reason, say) replaced by ``[erased]``."""
    if isinstance(value, dict):
        return {
            key: REPLACEMENTS[key] if key in REPLACEMENTS else scrub(item, personal)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scrub(item, personal) for item in value]
    if isinstance(value, str) and _mentions(value, personal):
        return ERASED_TEXT
    return value


def _mentions(text: str, personal: list[str]) -> bool:
    folded = text.casefold()
    return any(item.casefold() in folded for item in personal)


def searched(found: Iterable[str]) -> list[str]:
    """The personal text worth looking for inside other values: not our own replacements, not
    text so short it would match inside ordinary words; longest first, so a name inside an
    address is not replaced before the address."""
    candidates = set(found) - {ERASED_EMAIL, ERASED_TEXT, "unknown", "erased"}
    return sorted(
        (text for text in candidates if len(text) >= _MIN_SEARCHED_LENGTH), key=len, reverse=True
    )
