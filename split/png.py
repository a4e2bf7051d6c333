"""Minimal 8-bit grayscale PNG encode/decode with numpy + zlib (no Pillow on the device).

    data = encode_png(image_u8)          # (H, W) uint8 -> bytes
    image = decode_png(data)             # bytes -> (H, W) uint8; PngError naming what is wrong

The encoder writes one IDAT with the Up filter on every row (good for smooth frames). The
decoder reads what this encoder and most simple writers produce: bit depth 8, colour type 0
(grayscale), no interlace, filters None/Sub/Up; anything else is refused with a clear message.
Decompression is bounded by the size the header announces, so a hostile file cannot balloon.
"""
import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 8192


class PngError(ValueError):
    pass


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(image: np.ndarray, level: int = 9) -> bytes:
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise PngError(f"encode_png takes a (H, W) uint8 image, got shape {image.shape}")
    h, w = image.shape
    up = np.empty_like(image)
    up[0] = image[0]
    up[1:] = image[1:] - image[:-1]                                   # uint8 wrap-around, as PNG wants
    rows = np.concatenate([np.full((h, 1), 2, np.uint8), up], 1)      # (H, 1 + W): filter byte 2 = Up
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + \
        _chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    if not data.startswith(SIGNATURE):
        raise PngError("not a PNG (bad signature)")
    offset, header, idat = len(SIGNATURE), None, []
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        payload = data[offset + 8:offset + 8 + length]
        if len(payload) != length or offset + 12 + length > len(data):
            raise PngError(f"truncated {kind!r} chunk")
        offset += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise PngError("missing IHDR or IDAT chunk")
    w, h, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (8, 0, 0):
        raise PngError(f"only 8-bit grayscale, non-interlaced PNG is accepted (got bit depth {depth}, "
                       f"colour type {colour}, interlace {interlace})")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise PngError(f"image size {w}x{h} outside 1..{MAX_SIDE}")
    expected = h * (w + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), expected)
    except zlib.error as err:
        raise PngError(f"corrupt image data: {err}") from None
    if len(raw) != expected:
        raise PngError(f"image data holds {len(raw)} bytes, {w}x{h} needs {expected}")
    rows = np.frombuffer(raw, np.uint8).reshape(h, w + 1)
    filters, pixels = rows[:, 0], rows[:, 1:].copy()
    if np.any(filters > 2):
        raise PngError(f"PNG filter type {int(filters.max())} is not supported (None, Sub, Up are)")
    for y in range(h):
        if filters[y] == 1:
            pixels[y] = np.cumsum(pixels[y], dtype=np.uint8)
        elif filters[y] == 2 and y > 0:
            pixels[y] += pixels[y - 1]
    return pixels
