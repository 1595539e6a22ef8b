"""Text safe to print: control characters shown as escapes, never sent to a terminal.

Queue ids, labels, worker names and driver messages come from callers, annotators and
databases. Printed raw, an ``ESC`` sequence would drive the terminal and a newline would
forge a table row or a log line. :func:`printable` keeps ordinary text as it is and writes
every other character the way Python writes it in a string literal.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# control (Cc), format (Cf: bidi overrides), surrogates (Cs), unassigned, private use, and
# line/paragraph separators (Zl, Zp) all change what a terminal shows; spaces (Zs) do not
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: object) -> str:
    r"""``str(text)`` with every control or invisible character escaped (``\x1b``, ``\n``).

    Never raises: an object whose ``__str__`` fails is shown by its type name.
    """
    try:
        value = text if isinstance(text, str) else str(text)
    except Exception:
        return f"<{type(text).__name__}>"
    if value.isprintable():  # the common case, one C-level pass
        return value
    return "".join(
        char if char == " " or unicodedata.category(char) not in _UNSAFE else _escape(char)
        for char in value
    )


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
