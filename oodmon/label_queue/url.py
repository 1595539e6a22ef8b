"""Label-queue locations: which backend a URL names, and keeping its password out of sight.

A queue URL may carry credentials (``postgresql://user:secret@host/db``). Everything people
see (errors, logs, ``repr``, metrics) goes through :func:`redact_url` or :func:`scrub`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["QueueURL", "parse_url", "redact_url", "scrub"]


@dataclass(frozen=True)
class QueueURL:
    """A parsed queue location.

    Attributes:
        backend: ``"sqlite"`` or ``"postgresql"``.
        target: the SQLite file path, or the full PostgreSQL URL (with credentials).
        redacted: what may be shown to people: the URL with any password replaced by ``***``.
    """

    backend: str
    target: str
    redacted: str

    def __repr__(self) -> str:
        return f"QueueURL(backend={self.backend!r}, url={self.redacted!r})"


_SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "sslpassword"})
_SECRET_KV = re.compile(r"(?i)\b(password|sslpassword)\s*=\s*('[^']*'|[^\s&]+)")
# scheme://[userinfo@]host...: found by hand, since urlsplit rejects some malformed URLs
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)")


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or the query string) replaced by ``***``.

    Never raises, and works on malformed URLs too (which drivers may quote in errors).
    """
    text = _SECRET_KV.sub(r"\1=***", str(url))
    match = _AUTHORITY.match(text)
    if match is None or "@" not in match.group(2):
        return text
    userinfo, host = match.group(2).rsplit("@", 1)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return match.group(1) + userinfo + "@" + host + text[match.end() :]


def _secrets_of(url: str) -> list[str]:
    """The password strings in ``url`` (raw and percent-decoded), longest first."""
    found = {m.group(2).strip("'") for m in _SECRET_KV.finditer(url)}
    match = _AUTHORITY.match(url)
    if match is not None and "@" in match.group(2):
        userinfo = match.group(2).rsplit("@", 1)[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    found |= {unquote(s) for s in list(found)}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(message: str, url: str) -> str:
    """``message`` with every password of ``url`` replaced by ``***`` (for driver errors)."""
    for secret in _secrets_of(url):
        message = message.replace(secret, "***")
    return message


def parse_url(url: str | os.PathLike[str]) -> QueueURL:
    """Tell the backend from a queue URL or path.

    Accepted: ``postgresql://...`` / ``postgres://...``; ``sqlite:///rel.db``,
    ``sqlite:////abs.db``, ``sqlite:///:memory:``; or a plain file path.

    Raises:
        ValueError: an empty URL or an unsupported scheme.
    """
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Expected a label-queue URL or file path, but got an empty string.")
    lowered = text.lower()
    if lowered.startswith(("postgresql://", "postgres://")):
        return QueueURL("postgresql", text, redact_url(text))
    if lowered.startswith("sqlite:"):
        rest = text[len("sqlite:") :]
        if not rest.startswith("///"):
            raise ValueError(
                f"Expected an SQLite URL like sqlite:///relative.db or sqlite:////abs/path.db, "
                f"but got {redact_url(text)!r}."
            )
        path = rest[3:]
        if not path:
            raise ValueError("Expected a file name after sqlite:///, but got none.")
        return QueueURL("sqlite", path, f"sqlite:///{path}")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match:
        raise ValueError(
            f"Unsupported label-queue URL scheme {match.group(1)!r} in {redact_url(text)!r}: "
            "use a file path, sqlite:///path.db or postgresql://user@host/db."
        )
    return QueueURL("sqlite", text, text)
