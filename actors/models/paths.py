"""Where a model lives: a hub id (exactly owner/name) or a folder. Read by the configuration, which validates a
--model or rater location before anything heavy starts, and by the raters, which load from it."""

from __future__ import annotations

import os


def looks_like_local_path(path: str) -> bool:
    """Hub ids are exactly owner/name; anything else (absolute, ./, ~, a bare name, deeper paths) is a folder."""
    return (os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")) or "\\" in path
            or path.count("/") != 1)
