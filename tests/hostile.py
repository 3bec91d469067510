"""Small hostile files for the bad-input tests."""

import struct
import zlib


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose valid header declares width x height RGB pixels and which holds none of
    them: a decompression bomb of a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
