"""A loss-curve PNG drawn without a plotting library.

Deterministic bytes (no timestamp or software chunks), so a re-published card carries
the very same image, and no matplotlib dependency for one line chart.
"""
from __future__ import annotations

import struct
import zlib

WIDTH, HEIGHT, MARGIN = 480, 240, 24


def _png(pixels: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(pixels, x0, y0, x1, y1, shade=0) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        x = round(x0 + (x1 - x0) * i / steps)
        y = round(y0 + (y1 - y0) * i / steps)
        for dy in (0, 1):  # two pixels thick, readable when scaled down
            if 0 <= x < WIDTH and 0 <= y + dy < HEIGHT:
                pixels[y + dy][x] = shade


def loss_curve_png(points: list[tuple[float, float]]) -> bytes:
    """(step, loss) points → a PNG with axes and the loss as a polyline."""
    pixels = [bytearray([255] * WIDTH) for _ in range(HEIGHT)]
    left, bottom, right, top = MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN // 2, MARGIN // 2
    _line(pixels, left, top, left, bottom, 128)
    _line(pixels, left, bottom, right, bottom, 128)
    if not points:
        return _png(pixels)
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    s_lo, s_hi = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    l_lo, l_hi = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1

    def xy(step, loss):
        x = left + (step - s_lo) / (s_hi - s_lo) * (right - left)
        y = bottom - (loss - l_lo) / (l_hi - l_lo) * (bottom - top)
        return round(x), round(y)

    coords = [xy(s, v) for s, v in points]
    for (x0, y0), (x1, y1) in zip(coords, coords[1:]):
        _line(pixels, x0, y0, x1, y1)
    return _png(pixels)
