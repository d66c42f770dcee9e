"""A loss-curve PNG drawn without a plotting library.

Deterministic bytes (no timestamp or software chunks), so a re-published card carries
the very same image, and no matplotlib dependency for one line chart.
"""
from __future__ import annotations

import struct
import zlib

WIDTH, HEIGHT = 480, 240
LEFT, RIGHT, TOP, BOTTOM = 66, 12, 26, 34  # margins: room for the tick labels
SCALE = 2  # each font pixel is SCALE × SCALE image pixels

# A 3×5 pixel font for what the axes say: digits, ".", "-", "e" (tick values such as
# 1.5e-03) and the axis names "loss" and "step". Rows top to bottom, "#" is ink.
FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."), "e": ("...", "###", "###", "#..", "###"),
    "l": ("#..", "#..", "#..", "#..", "##."), "o": ("...", "###", "#.#", "#.#", "###"),
    "s": ("...", "###", "##.", "..#", "###"), "t": (".#.", "###", ".#.", ".#.", ".##"),
    "p": ("...", "###", "#.#", "###", "#.."), " ": ("...", "...", "...", "...", "..."),
}
GLYPH_W = (3 + 1) * SCALE  # advance: glyph and one pixel of space
GLYPH_H = 5 * SCALE


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


def _text(pixels, x: int, y: int, text: str, shade: int = 0) -> None:
    """Draw `text` with its top-left corner at (x, y); unknown characters are skipped."""
    for i, ch in enumerate(text):
        for row, bits in enumerate(FONT.get(ch, FONT[" "])):
            for col, bit in enumerate(bits):
                if bit != "#":
                    continue
                for dy in range(SCALE):
                    for dx in range(SCALE):
                        px, py = x + i * GLYPH_W + col * SCALE + dx, y + row * SCALE + dy
                        if 0 <= px < WIDTH and 0 <= py < HEIGHT:
                            pixels[py][px] = shade


def _tick(value: float) -> str:
    """A tick label short enough for the margin: 4 significant digits, plain or e-form."""
    text = f"{value:.4g}"
    return text if len(text) <= 7 else f"{value:.1e}"


def loss_curve_png(points: list[tuple[float, float]]) -> bytes:
    """(step, loss) points → a PNG of the loss as a polyline, with axes, the first and
    last step and the highest and lowest loss as tick labels, and the axes named
    ("step", "loss")."""
    pixels = [bytearray([255] * WIDTH) for _ in range(HEIGHT)]
    left, bottom, right, top = LEFT, HEIGHT - BOTTOM, WIDTH - RIGHT, TOP
    _line(pixels, left, top, left, bottom, 128)
    _line(pixels, left, bottom, right, bottom, 128)
    _text(pixels, 2, 2, "loss", 64)
    _text(pixels, right - 4 * GLYPH_W, HEIGHT - GLYPH_H - 2, "step", 64)
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

    for value, label in ((max(losses), _tick(max(losses))), (min(losses), _tick(min(losses)))):
        y = xy(s_lo, value)[1]
        _line(pixels, left - 4, y, left, y, 128)
        _text(pixels, left - 6 - len(label) * GLYPH_W, max(0, y - GLYPH_H // 2), label, 64)
    for step in sorted({min(steps), max(steps)}):
        x = xy(step, l_lo)[0]
        _line(pixels, x, bottom, x, bottom + 4, 128)
        label = str(int(step)) if float(step).is_integer() else _tick(step)
        x_text = min(max(0, x - len(label) * GLYPH_W // 2), WIDTH - len(label) * GLYPH_W)
        _text(pixels, x_text, bottom + 7, label, 64)
    coords = [xy(s, v) for s, v in points]
    for (x0, y0), (x1, y1) in zip(coords, coords[1:]):
        _line(pixels, x0, y0, x1, y1)
    return _png(pixels)


def loss_chart(points: list[tuple[float, float]], width: int = 56, height: int = 8) -> str:
    """A loss curve as text (monospace, ASCII): y axis labelled with the highest and
    lowest loss, x axis with the first and last step.

    Args:
        points: (step, loss) in step order.
        width, height: the plot area in characters.
    Returns:
        The chart's lines joined by newlines ("" without points).
    """
    if not points:
        return ""
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    s_lo, s_hi = min(steps), max(steps)
    l_lo, l_hi = min(losses), max(losses)
    grid = [[" "] * width for _ in range(height)]
    for s, v in points:
        x = round((s - s_lo) / (s_hi - s_lo) * (width - 1)) if s_hi > s_lo else 0
        y = round((l_hi - v) / (l_hi - l_lo) * (height - 1)) if l_hi > l_lo else height - 1
        grid[y][x] = "*"
    top, bottom = f"{l_hi:.4f}", f"{l_lo:.4f}"
    pad = max(len(top), len(bottom))
    rows = ["loss".rjust(pad)]
    for y, row in enumerate(grid):
        label = top if y == 0 else bottom if y == height - 1 else ""
        rows.append(f"{label.rjust(pad)} |{''.join(row).rstrip()}")
    rows.append(" " * pad + " +" + "-" * width)
    first, last = str(int(s_lo)), str(int(s_hi))
    rows.append(" " * (pad + 2) + first + last.rjust(width - len(first)) + "  step")
    return "\n".join(rows)
