"""A font that draws every prompt: CJK, accents and Latin alike, found at run time; used for contact sheets.

Preference order: Noto Sans CJK (Debian `fonts-noto-cjk`; it covers Latin, accents and CJK), any font fontconfig
offers for a CJK language, DejaVu Sans (accents, no CJK), then Pillow's built-in font with a one-line warning.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess

logger = logging.getLogger("seedsift")
CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKjp-Regular.otf",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",
)
FALLBACKS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)


@functools.lru_cache(maxsize=1)
def font_path() -> str | None:
    """The path of the best font found, or None (Pillow's default will be used)."""
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", ":lang=ja"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        if found and os.path.exists(found) and "dejavu" not in found.lower():
            return found
    for path in FALLBACKS:
        if os.path.exists(path):
            logger.warning("no CJK font found (install fonts-noto-cjk); Japanese or Chinese prompts are drawn as boxes")
            return path
    logger.warning("no scalable font found (install fonts-noto-cjk); prompts are drawn with Pillow's basic font")
    return None


def text_font(size: int):
    from PIL import ImageFont

    path = font_path()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
