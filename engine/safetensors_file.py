"""The one parser of a safetensors file's header (stdlib only: no torch, no safetensors package).

Layout: 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape,
data_offsets}, "__metadata__": ...}`), then the data; offsets count from byte 8 + N. The model
cache marker, checkpoint sync and the shipped-readout check all read headers through here, so a
malformed file is described the same way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path


class HeaderError(ValueError):
    """Not a complete safetensors file; the message says what is wrong with it."""


def read_header(path: Path) -> tuple[int, dict]:
    """(header length N, parsed header); raises HeaderError if malformed or truncated."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise HeaderError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size:
            raise HeaderError(f"{path.name}: header length {n} does not fit file of {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise HeaderError(f"{path.name}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name}: header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise HeaderError(f"{path.name}: a tensor entry has no valid data_offsets") from None
    if 8 + n + end != size:
        raise HeaderError(f"{path.name}: data ends at {8 + n + end} but file has {size} bytes (truncated write?)")
    return n, header


def header_length(fd: int) -> int:
    """N from an open file descriptor, without validating (0 if the file is shorter than 8 bytes)."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0).ljust(8, b"\0"))
    return n


def header_sha256(path: Path | None = None, *, fd: int | None = None, length: int | None = None) -> str:
    """sha256 of the first 8 + N bytes (length prefix + JSON header): identifies layout and metadata, not data."""
    if fd is None:
        n = read_header(Path(path))[0] if length is None else length  # type: ignore[arg-type]
        with Path(path).open("rb") as fh:  # type: ignore[arg-type]
            return hashlib.sha256(fh.read(8 + n)).hexdigest()
    n = header_length(fd) if length is None else length
    return hashlib.sha256(os.pread(fd, 8 + n, 0)).hexdigest()
