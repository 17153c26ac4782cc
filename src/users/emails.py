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


# Lower-case Cyrillic and Greek letters that pass for Latin ones (the set browsers use to show
# such domains as punycode): a part made only of these reads as a Latin word ("apple", "paypal").
_LATIN_LOOKALIKES = frozenset(
    "\u0430\u0441\u0501\u0435\u04bb\u0456\u0458\u04cf\u043e\u0440\u051b\u0455\u051d"
    "\u0445\u0443\u044a\u044c\u04bd\u043f\u0433\u0475\u0461"  # Cyrillic
    "\u03b1\u03b9\u03ba\u03bd\u03bf\u03c1\u03c5\u03c7"  # Greek
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


def _passes_for_latin(part: str) -> bool:
    """A whole part written in Cyrillic or Greek letters that all look like Latin ones."""
    letters = [char for char in part if _script(char) is not None]
    scripts = {_script(char) for char in letters}
    return bool(letters) and scripts <= {"CYRILLIC", "GREEK"} and set(letters) <= _LATIN_LOOKALIKES


def confusable_reason(address: str) -> str | None:
    """Why an address could pass for another one, or ``None`` when it could not."""
    if unicodedata.normalize("NFKC", address) != address:
        return "it contains compatibility characters (such as full-width letters)"
    if any(unicodedata.category(char) in ("Cf", "Cc", "Co", "Cn") for char in address):
        return "it contains invisible or unassigned characters"
    local, _, domain = address.rpartition("@")
    parts = (local, *domain.split("."))
    if any(_mixes_scripts(part) for part in parts):
        return "it mixes letters of different scripts"
    if any(_passes_for_latin(part) for part in parts):
        return "it is written in letters that look like Latin ones"
    return None
