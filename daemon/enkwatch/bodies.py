"""Reading a peer's answer with a bound on the DECODED bytes, whatever its content coding.

aiohttp inflates gzip, deflate, br and zstd bodies as they are read from `resp.content`
(`auto_decompress`), a bounded window at a time: the number of bytes on the wire, and the
`Content-Length` that announces it, say nothing about the size of what comes out. So the
limit is counted on the decoded stream, read incrementally; once it is passed the rest is
never read, and leaving the response closes the connection instead of draining it.
"""

from __future__ import annotations

from typing import Final

import aiohttp

READ_CHUNK_BYTES: Final = 64 * 1024


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole decoded body, or None as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        # never ask for more than one byte past the limit: that byte is the proof it is over
        chunk = await resp.content.read(min(READ_CHUNK_BYTES, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


async def read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most the first `limit` decoded bytes of the body (all of a short one, which lets
    the connection be reused); the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        size += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["read_bounded", "read_prefix"]
