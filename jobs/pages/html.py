"""What every seedsift page shares: the document around a body, the base style, and how a number is shown. The run
report (jobs/pages/report.py) and the evaluation (jobs/pages/evaluation.py) are built on it."""

from __future__ import annotations

import html

BASE_STYLE = """
body{font-family:"Noto Sans","Noto Sans CJK JP",sans-serif;margin:20px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.muted{color:#777}svg text{font-size:11px}
"""


def page(title: str, body: str, style: str = "", script: str = "") -> str:
    """A self-contained HTML document: the base style plus the page's own, the body, then the page's script."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{BASE_STYLE}{style}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def number(value, digits: int = 3, fixed: bool = False, missing: str = "-") -> str:
    """A figure as a page shows it: `digits` significant digits (or decimals when `fixed`); `missing` for no value."""
    if value is None or (isinstance(value, float) and value != value):
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}" if fixed else f"{value:.{digits}g}"
    return str(value)
