"""Email addresses: the one canonical form every path uses, and look-alike detection.

Registration, sign-in, password reset, verification and email change all look accounts up by
``canonical_email``, so ``Alice@Example.com``, ``alice@EXAMPLE.COM`` and an address typed with a
combining accent (``e`` + U+0301) instead of the precomposed ``é`` all reach the same account.

``confusable_reason`` finds addresses made to look like someone else's: letters from two scripts in
one part ("paypal" with a Cyrillic U+0430 for its first "a"), invisible characters, and
compatibility forms (a full-width U+FF55 for "u"). ``EMAIL_REFUSE_CONFUSABLE`` refuses them for new
and changed addresses.
"""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

MAX_LENGTH = 320

# Script mixes that are normal in real names (Unicode TS #39's "highly restrictive" profile):
# Japanese, Chinese and Korean writing combine Han with their own scripts and with Latin.
_ALLOWED_MIXES = (
    frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "CJK", "BOPOMOFO"}),
    frozenset({"LATIN", "CJK", "HANGUL"}),
)


def canonical_email(text: str) -> str | None:
    """The stored form of an address (NFC, lower case, IDNA domain in Unicode), or ``None`` when
    the text is not an address any account can have."""
    if len(text) > MAX_LENGTH:
        return None
    try:
        normalized = validate_email(text.strip(), check_deliverability=False).normalized
    except EmailNotValidError:
        return None
    # Lower-casing can decompose a character (U+0130 becomes "i" + U+0307): normalise again.
    return unicodedata.normalize("NFC", normalized.lower())


def _script(char: str) -> str | None:
    """The script of a letter, from its Unicode name ("CYRILLIC SMALL LETTER A" -> CYRILLIC)."""
    if not unicodedata.category(char).startswith("L"):
        return None  # digits, dots, hyphens... belong to every script
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def _mixes_scripts(part: str) -> bool:
    scripts = {script for script in map(_script, part) if script is not None}
    if len(scripts) <= 1:
        return False
    return not any(scripts <= allowed for allowed in _ALLOWED_MIXES)


def confusable_reason(address: str) -> str | None:
    """Why an address could pass for another one, or ``None`` when it could not."""
    if unicodedata.normalize("NFKC", address) != address:
        return "it contains compatibility characters (such as full-width letters)"
    if any(unicodedata.category(char) in ("Cf", "Cc", "Co", "Cn") for char in address):
        return "it contains invisible or unassigned characters"
    local, _, domain = address.rpartition("@")
    if any(_mixes_scripts(part) for part in (local, *domain.split("."))):
        return "it mixes letters of different scripts"
    return None
