"""Shared pytest set-up: the root scripts are imported as modules, so the repo root goes on sys.path."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_px=100, max_px=5000, min_bytes=1024):
    """A figure test's check that `path` is a real PNG of sane size, not an empty or stub
    file: the 8-byte signature, an IHDR width and height (big-endian uint32 at bytes 16..24)
    between min_px and max_px, and more than min_bytes on disk. Test files use it through
    `from conftest import assert_png` (pytest puts tests/ on sys.path)."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG (starts {data[:8]!r})"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert min_px <= width <= max_px and min_px <= height <= max_px, \
        f"{path}: {width}x{height} px, expected each side in [{min_px}, {max_px}]"
    assert len(data) > min_bytes, f"{path}: only {len(data)} bytes"
    return width, height
