"""Compression bombs for tests: a small body on the wire that inflates to `fill` bytes.

Built in a few milliseconds whatever the size: one megabyte of filler is compressed once
with a full flush (which makes the compressed block independent of what came before), the
block is repeated, and the gzip or zlib header and checksum are written around it.
"""

from __future__ import annotations

import struct
import zlib

BLOCK = 1024 * 1024


def _raw_deflate(head: bytes, fill: int, tail: bytes, byte: bytes) -> tuple[bytes, int, int]:
    """Raw deflate of head + byte*fill + tail; its CRC-32 and Adler-32."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)]
    block = byte * BLOCK
    packed = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    adler = zlib.adler32(head)
    for _ in range(fill // BLOCK):
        parts.append(packed)
        crc = zlib.crc32(block, crc)
        adler = zlib.adler32(block, adler)
    rest = byte * (fill % BLOCK) + tail
    parts.append(comp.compress(rest) + comp.flush())
    crc = zlib.crc32(rest, crc)
    adler = zlib.adler32(rest, adler)
    return b"".join(parts), crc, adler


def bomb(coding: str, fill: int, head: bytes = b"", tail: bytes = b"", byte: bytes = b"0") -> bytes:
    """`head + byte * fill + tail`, encoded as Content-Encoding `coding` (gzip or deflate)."""
    raw, crc, adler = _raw_deflate(head, fill, tail, byte)
    size = len(head) + fill + len(tail)
    if coding == "gzip":
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        return header + raw + struct.pack("<II", crc, size & 0xFFFFFFFF)
    if coding == "deflate":
        return b"\x78\xda" + raw + struct.pack(">I", adler)
    raise ValueError(coding)
