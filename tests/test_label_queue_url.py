"""Queue locations (``label_queue.url``): which backend a URL names; passwords redacted."""

from __future__ import annotations

import pytest

from oodmon.label_queue.url import parse_url, redact_url, scrub


@pytest.mark.parametrize(
    ("url", "backend", "target"),
    [
        ("labels.db", "sqlite", "labels.db"),
        ("sqlite:///rel/labels.db", "sqlite", "rel/labels.db"),
        ("sqlite:////abs/labels.db", "sqlite", "/abs/labels.db"),
        ("postgresql://u:pw@h:5432/db", "postgresql", "postgresql://u:pw@h:5432/db"),
        ("postgres://h/db", "postgresql", "postgres://h/db"),
    ],
)
def test_parse_url(url, backend, target):
    parsed = parse_url(url)
    assert (parsed.backend, parsed.target) == (backend, target)
    assert "pw" not in repr(parsed)


@pytest.mark.parametrize("bad", ["", "mysql://u:hunter2@h/db", "sqlite:relative.db"])
def test_bad_urls(bad):
    with pytest.raises(ValueError) as info:
        parse_url(bad)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://alice:s3cr%40t@db.example:5432/q",
            "postgresql://alice:***@db.example:5432/q",
        ),
        (
            "postgresql://alice@db/q?password=s3cr&sslmode=require",
            "postgresql://alice@db/q?password=***&sslmode=require",
        ),
        ("postgresql://db/q", "postgresql://db/q"),
        ("host=db password=s3cr user=x", "host=db password=*** user=x"),
        ("postgresql://u:s3cr@[::1/db", "postgresql://u:***@[::1/db"),  # malformed
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


SECRET = "Sw0rdf1sh"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://alice:{SECRET}/x?y#z@db:5432/q",  # unencoded / ? #
        f"postgresql://alice:{SECRET}#1@db/q",
        f"host=db port=5432 user=alice password={SECRET} dbname=q",  # libpq keywords
        f"host=db password='{SECRET} x' dbname=q",
        f"postgresql:alice:{SECRET}@db/q",  # the // forgotten
    ],
)
def test_what_is_neither_a_url_nor_a_path_is_refused_without_the_password(
    url, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no file named after the password


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"postgresql://alice:{SECRET}/x?y#z@db:5432/q", "postgresql://alice:***@db:5432/q"),
        (f"postgresql://alice:{SECRET}@x@db/q", "postgresql://alice:***@db/q"),
        (f"postgresql:alice:{SECRET}@db/q", "postgresql:alice:***@db/q"),
        (f"host=db password = {SECRET} user=x", "host=db password=*** user=x"),
    ],
)
def test_every_password_form_is_redacted(url, redacted):
    assert redact_url(url) == redacted
    assert SECRET not in scrub(f"driver said: could not parse {url!r}", url)
