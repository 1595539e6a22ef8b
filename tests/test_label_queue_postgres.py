"""The PostgreSQL backend (``label_queue.postgres``): its errors never show the password."""

from __future__ import annotations

import logging

import postgres_server
import pytest

from oodmon.label_queue import LabelQueue, QueueUnavailableError


def test_connection_errors_never_show_the_password(caplog):
    pytest.importorskip("psycopg")
    port = postgres_server.free_port()  # nothing listens there
    secret = "Sup3rS3cret-pw"
    url = f"postgresql://alice:{secret}@127.0.0.1:{port}/labels?connect_timeout=2"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QueueUnavailableError) as info:
        LabelQueue(url)
    err = info.value
    assert "alice:***@127.0.0.1" in str(err)
    chain = [err, err.__cause__]
    assert not any(secret in repr(e) or secret in str(e) for e in chain if e is not None)
    assert err.__suppress_context__  # the driver's own error (which may quote the URL) is hidden
    assert secret not in caplog.text


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://alice:{pw}@[::1/labels",  # malformed: the driver quotes the URL back
        "postgresql://alice:{pw}@127.0.0.1:1/labels?bogus=1",
        "postgresql://alice@127.0.0.1:1/labels?password={pw}&bogus=1",
    ],
)
def test_malformed_urls_never_show_the_password(template):
    pytest.importorskip("psycopg")
    secret = "Sup3rS3cret-pw"
    with pytest.raises((ValueError, QueueUnavailableError)) as info:
        LabelQueue(template.format(pw=secret), timeout=1)
    assert secret not in str(info.value) and "***" in str(info.value)
