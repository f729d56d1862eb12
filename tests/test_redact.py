"""`redact_url`: the one way a URL is shown."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enkwatch.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXX", "https://hooks.slack.com/[redacted]"),
        (
            "postgresql://enk:pa55word@db.internal:5432/enkwatch?sslmode=require",
            "postgresql://[redacted]@db.internal:5432/[redacted]?[redacted]",
        ),
        ("postgres://enk@db/enkwatch", "postgres://[redacted]@db/[redacted]"),
        ("postgresql:///enkwatch?host=/run/pg&password=x", "postgresql:///[redacted]?[redacted]"),
        ("https://user:token@example.test", "https://[redacted]@example.test"),
        (
            "https://example.test/hook?token=abc#frag",
            "https://example.test/[redacted]?[redacted]#[redacted]",
        ),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("https://example.test", "https://example.test"),
        ("https://example.test:99999/x", "[redacted]"),  # a port that does not parse
        ("https://[::1/x", "[redacted]"),  # a bracket that does not close
        ("enkwatch-state.db", "enkwatch-state.db"),  # not a URL: shown as it is
        (":memory:", ":memory:"),
    ],
)
def test_what_is_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown


_secret = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=12,
    max_size=30,
)


@given(
    scheme=st.sampled_from(["http", "https", "postgresql", "postgres"]),
    user=_secret,
    password=_secret,
    path=_secret,
    query=_secret,
)
def test_no_part_that_may_hold_a_secret_is_shown(
    scheme: str, user: str, password: str, path: str, query: str
) -> None:
    url = f"{scheme}://{user}:{password}@host.example.test:5432/a/{path}?token={query}#{path}"
    shown = redact_url(url)
    for secret in (user, password, path, query):
        assert secret not in shown
    assert shown.startswith(f"{scheme}://[redacted]@host.example.test:5432/")
