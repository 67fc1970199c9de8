"""Names people and clients choose, and text that is echoed back or logged.

A name (user id, group, pool, limit target, model) is stored in a 255-character column,
is part of counter keys (where ``|`` separates fields) and appears in log lines, where a
newline or an escape sequence could forge a line or repaint a terminal. So names are
printable text of at most :data:`MAX_NAME` characters without ``|``; anything else is
refused where it enters. Text that is only echoed (an unknown model in a 404, a path in
the access log) is shortened instead, with :func:`shown`. URLs in messages lose their
passwords with :func:`masked`.
"""

from __future__ import annotations

import re

from quotagate.core.errors import InvalidInput

#: Longest name QuotaGate stores (the width of its name columns).
MAX_NAME = 255
#: Longest client-given text echoed in an error or written to a log line.
MAX_SHOWN = 200

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):\S*@")


def check_name(
    value: object, what: str, *, max_length: int = MAX_NAME, allow_bar: bool = False
) -> str:
    """`value` if it is a usable name, else an InvalidInput that says why.

    Printable means no control, format or separator characters (``str.isprintable``,
    which a plain space passes): a newline in a user id would forge a log line. `allow_bar`
    is for names that never become part of a counter key (model ids).
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string, got {shown_repr(value)}")
    if len(value) > max_length:
        raise InvalidInput(f"{what} must be at most {max_length} characters, got {len(value):,}")
    if not allow_bar and "|" in value:
        raise InvalidInput(f"{what} must not contain '|': {shown_repr(value)}")
    if not value.isprintable():
        raise InvalidInput(f"{what} must not contain control characters: {shown_repr(value)}")
    return value


def printable(text: str) -> str:
    """`text` without its control, format and separator characters (for what is only
    informative, such as a display name, and is kept rather than refused)."""
    return text if text.isprintable() else "".join(c for c in text if c.isprintable())


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` shortened to about `limit` characters for an error message or a log line."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def shown_repr(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` shortened: escapes control characters, so it is safe in a log line."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    return shown(repr(value), limit)


def masked(text: str) -> str:
    """`text` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
