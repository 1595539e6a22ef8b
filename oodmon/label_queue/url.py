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


_SECRET_KV = re.compile(r"(?i)\b(password|sslpassword)\s*=\s*('[^']*'|[^\s&]+)")
# "scheme://", or a PostgreSQL scheme without the // (a slip that still carries a password)
_SCHEME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|(?i:postgres|postgresql|pg|psql)(?:\+[A-Za-z0-9]+)?:)"
)
# libpq's key=value connection strings ("host=db password=..."): not a path, not a URL
_LIBPQ_KEYWORD = re.compile(
    r"(?i)(?:^|\s)(host|hostaddr|port|dbname|user|password|passfile|service|sslmode|"
    r"connect_timeout|options|application_name)\s*="
)
# a database scheme without the // of a URL ("postgresql:user:pw@host"): not a file name
_SCHEME_WITHOUT_SLASHES = re.compile(r"(?i)^(postgres|postgresql|pg|psql)(\+[a-z0-9]+)?:(?!//)")


def _userinfo_password(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host`` lies in ``url``, or None.

    The user info ends at the *last* ``@``: a password holding an unencoded ``/``, ``?``,
    ``#`` or ``@`` is still found whole (a ``@`` later in the query only over-redacts).
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    at = url.rfind("@", scheme.end())
    colon = url.find(":", scheme.end(), at)
    if at < 0 or colon < 0:
        return None
    return colon + 1, at


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or the query string) replaced by ``***``.

    Never raises, and works on malformed URLs too (which drivers may quote in errors), on
    passwords with unencoded ``/ ? # @`` and on libpq ``key=value`` strings.
    """
    text = str(url)
    span = _userinfo_password(text)
    if span is not None:
        text = text[: span[0]] + "***" + text[span[1] :]
    return _SECRET_KV.sub(r"\1=***", text)


def _secrets_of(url: str) -> list[str]:
    """The password strings in ``url`` (raw and percent-decoded), longest first."""
    found = {m.group(2).strip("'") for m in _SECRET_KV.finditer(url)}
    span = _userinfo_password(url)
    if span is not None:
        found.add(url[span[0] : span[1]])
        # how a URL parser that stops at the first / ? # would read it, too
        authority = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)", url)
        if authority is not None and ":" in authority.group(1):
            found.add(authority.group(1).split(":", 1)[1].rsplit("@", 1)[0])
    found |= {unquote(s) for s in list(found)}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(message: str, url: str) -> str:
    """``message`` with every password of ``url`` replaced by ``***`` (for driver errors)."""
    for secret in _secrets_of(url):
        message = message.replace(secret, "***")
    return message


def _check_postgres_url(text: str) -> None:
    """Refuse a password holding an unencoded ``/``, ``?`` or ``#`` (drivers misread it)."""
    span = _userinfo_password(text)
    if span is None:
        return
    password = text[span[0] : span[1]]
    cut = min((password.find(c) for c in "/?#" if c in password), default=-1)
    if cut >= 0 and not password[:cut].isdigit():  # digits first: a port, then a path
        raise ValueError(
            f"Expected a PostgreSQL URL with a percent-encoded password, but the password in "
            f"{redact_url(text)!r} holds an unencoded '/', '?' or '#': encode them as %2F, "
            "%3F and %23 (urllib.parse.quote(password, safe=''))."
        )


def parse_url(url: str | os.PathLike[str]) -> QueueURL:
    """Tell the backend from a queue URL or path.

    Accepted: ``postgresql://...`` / ``postgres://...``; ``sqlite:///rel.db``,
    ``sqlite:////abs.db``, ``sqlite:///:memory:``; or a plain file path. A libpq
    ``key=value`` string is refused rather than taken for a file name (which would put the
    password in a file name), and so is a password with unencoded ``/ ? #``.

    Raises:
        ValueError: an empty URL, an unsupported scheme, or neither a URL nor a path.
    """
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("Expected a label-queue URL or file path, but got an empty string.")
    lowered = text.lower()
    if lowered.startswith(("postgresql://", "postgres://")):
        _check_postgres_url(text)
        return QueueURL("postgresql", text, redact_url(text))
    if _SCHEME_WITHOUT_SLASHES.match(text) or ("://" not in text and _LIBPQ_KEYWORD.search(text)):
        raise ValueError(
            f"Expected a label-queue URL or file path, but got {redact_url(text)!r}, which "
            "looks like a PostgreSQL connection string: write it as a URL, "
            "postgresql://user:password@host:port/dbname (percent-encode the password), or, "
            "if it really is a file name, as sqlite:///<name>."
        )
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
    return QueueURL("sqlite", text, redact_url(text))
