"""The one way a URL is shown: scheme, host and port; whatever may hold a secret, redacted.

URLs carry credentials in more places than the password: a webhook's path is often its
token (Slack's `https://hooks.slack.com/services/T000/B000/XXXX`), a query may hold
`?token=` or `?password=`, and a `postgresql://user:password@host/db` URL holds both. What
is left is what an operator needs to tell one URL from another: which kind, which host.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

REDACTED: Final = "[redacted]"


def redact_url(url: str) -> str:
    """`scheme://host[:port]`, with user info, path, query and fragment each `[redacted]`.

    A string that is not a URL (a SQLite path, ":memory:") is returned as it is.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bracket or a port that does not parse: show nothing of it
        return REDACTED
    if not parts.scheme:
        return REDACTED
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    out = f"{parts.scheme}://"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        out += f"{REDACTED}@"
    out += host
    if port is not None:
        out += f":{port}"
    if parts.path not in ("", "/"):
        out += f"/{REDACTED}"
    if parts.query:
        out += f"?{REDACTED}"
    if parts.fragment:
        out += f"#{REDACTED}"
    return out


__all__ = ["REDACTED", "redact_url"]
