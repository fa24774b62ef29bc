"""The report of a generate or collect run: OUT/report.html, to browse what was made and what was not.

Written at the end of every generate and collect run; `seedsift report OUT` (jobs/report.py) rebuilds it. The page is
self-contained (inline CSS, JavaScript and SVG) except for images, which it links relatively, so the output folder
can be opened, copied or served as it is.

Light at any size. The front page reads no row it does not show: totals, reasons and histograms come from the
shards' statistics, and its grid shows a sample of at most GRID_MAX images (every image of up to SAMPLED_SHARDS
shards chosen at random, then a uniform sample of those), sortable and filterable in the page. Every committed
row, images and quarantined or failed rows with their reasons, is listed on per-shard pages of PAGE_ROWS rows
(`report/<file>/<n>-<page>.html`), written once per shard state: a rerun writes pages only for shards that changed.
Images inside WebDataset tars cannot be linked as files, so their thumbnails are written to `report/thumbs/` for the
front page's sample only; the shard pages name their tar and member.
"""

from __future__ import annotations

import hashlib
import html
import io
import random

import numpy as np

from jobs.pages.html import number
from jobs.pages.html import page as document
from orchestrator.output.manifest import Manifest, split_shard_id
from orchestrator.output.storage import Output
from orchestrator.output.summary import merge_stats, quantile, shard_stats

REPORT_FILE = "report.html"
PAGES = "report"
GRID_MAX = 400
SAMPLED_SHARDS = 8
PAGE_ROWS = 500
LISTED_PROBLEMS = 500
THUMB = 192
COLUMNS = ["prompt_id", "prompt", "source", "seed", "candidate_index", "rank", "planned", "predicted_score",
           "prompt_predicted_mean", "prompt_predicted_std", "score", "status", "error", "image_key", "image_member",
           "image_offset", "image_size", "shard", "shard_row"]

STYLE = """
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:200px;font-size:12px;border:1px solid #ddd;padding:4px}
.card img{width:192px;height:192px;object-fit:contain;background:#eee;display:block}
.prompt{height:3em;overflow:hidden}.controls{margin:8px 0}.bad{color:#a00}
"""

SCRIPT = """
const grid=document.getElementById('grid');
function apply(){const key=document.getElementById('sort').value, q=document.getElementById('q').value.toLowerCase();
 const cards=[...grid.children];
 cards.sort((a,b)=>key==='prompt'?a.dataset.prompt.localeCompare(b.dataset.prompt):
  (parseFloat(b.dataset[key])||-1e9)-(parseFloat(a.dataset[key])||-1e9));
 for(const c of cards){grid.appendChild(c);c.style.display=c.dataset.prompt.toLowerCase().includes(q)?'':'none';}}
document.getElementById('sort').onchange=apply;document.getElementById('q').oninput=apply;
"""


def _shown_location(output) -> str:
    """Where the run is, as the page shows it: an object store URI in full; a local output by its folder name only,
    since the page lives inside it and an absolute path goes stale once the output is moved or copied."""
    return output.uri if not output.is_local else output.uri.rstrip("/").rsplit("/", 1)[-1]


def write_report(output: Output, seed: int = 0) -> str:
    """Write OUT/report.html (and the shard pages it needs); returns its URI."""
    manifest = Manifest(output)
    manifest.require_run()
    run = manifest.read_run()
    summary = output.read_json("summary.json") if output.exists("summary.json") else {}
    records = manifest.complete_records()
    open_parts = manifest.open_parts()
    open_tables = {shard: manifest.read_shard(shard, COLUMNS, complete=shard in records, parts=parts)
                   for shard, parts in open_parts.items() if shard not in records}
    stats = merge_stats([r.stats for r in records.values()]
                        + [shard_stats(t) for t in open_tables.values() if t is not None])
    pages = _write_shard_pages(output, manifest, records, open_tables)
    sample_shards = sorted(records) + sorted(open_tables)
    chooser = random.Random(seed)
    chosen = sorted(chooser.sample(sample_shards, min(SAMPLED_SHARDS, len(sample_shards))))
    rows, problems = [], []
    for shard in chosen:
        table = open_tables.get(shard) if shard in open_tables else manifest.read_complete(shard, COLUMNS)
        if table is None:
            continue
        for row in table.to_pylist():
            (rows if row["status"] == "ok" else problems).append(row)
    shown = chooser.sample(rows, min(GRID_MAX, len(rows))) if len(rows) > GRID_MAX else rows
    images = [_image_link(output, manifest, row, thumbnail=True) for row in shown]
    page = _front_page(output, run, summary, stats, shown, images, problems, pages, len(sample_shards), chosen)
    output.write_bytes(REPORT_FILE, page.encode("utf-8"))
    return output.uri_of(REPORT_FILE)


def _image_link(output: Output, manifest: Manifest, row: dict, thumbnail: bool) -> str | None:
    """A relative link to a row's image: the file itself, or (inside a tar) a thumbnail written for the report."""
    if not row.get("image_key"):
        return None
    if not row.get("image_member"):
        return row["image_key"]
    if not thumbnail:
        return None
    from PIL import Image

    name = hashlib.blake2b(f"{row['image_key']}#{row['image_member']}".encode(), digest_size=8).hexdigest()
    key = f"{PAGES}/thumbs/{name}.jpg"
    if not output.exists(key):
        image = Image.open(io.BytesIO(manifest.read_image(row))).convert("RGB")
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        output.write_bytes(key, buffer.getvalue())
    return key


def _card(row: dict, link: str | None, prefix: str = "") -> str:
    text = html.escape(row.get("prompt") or "")
    if link:
        image = (f'<a href="{html.escape(prefix + link)}"><img loading="lazy" src="{html.escape(prefix + link)}" '
                 f'alt="{text}"></a>')
    else:  # inside a WebDataset tar (or not stored): name where it is
        image = (f'<div class="muted">{html.escape(row.get("image_key") or "no image stored")}<br>'
                 f'{html.escape(row.get("image_member") or "")}</div>')
    data = {"score": row.get("score"), "predicted": row.get("predicted_score"),
            "difficulty": row.get("prompt_predicted_mean"), "spread": row.get("prompt_predicted_std")}
    attributes = " ".join(f'data-{k}="{"" if v is None else v}"' for k, v in data.items())
    return (f'<div class="card" data-prompt="{text}" {attributes}>{image}<div class="prompt" title="{text}">{text}'
            f'</div><div>seed {row.get("seed")} · cand {row.get("candidate_index")} · rank {row.get("rank")} of '
            f'{row.get("planned")}</div><div>rated {number(row.get("score"))} · predicted '
            f'{number(row.get("predicted_score"))}</div><div class="muted">prompt mean '
            f'{number(row.get("prompt_predicted_mean"))} ± {number(row.get("prompt_predicted_std"))}</div></div>')


def _histogram(sketch: dict | None, title: str, bins: int = 24) -> str:
    """An SVG histogram of a distribution from its quantile sketch (equal shares between its points)."""
    if not sketch:
        return f"<p class='muted'>{html.escape(title)}: no values</p>"
    points = np.asarray(sketch["q"], dtype=float)
    low, high = float(points[0]), float(points[-1])
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    shares = np.diff(np.interp(edges, points, np.linspace(0, 1, len(points))))
    width, height = 360, 120
    top = shares.max() or 1.0
    bars = "".join(f'<rect x="{30 + i * (width - 40) / bins:.1f}" y="{height - 20 - s / top * (height - 40):.1f}" '
                   f'width="{(width - 40) / bins - 1:.1f}" height="{s / top * (height - 40):.1f}" fill="#4a7"/>'
                   for i, s in enumerate(shares))
    return (f'<svg width="{width}" height="{height}"><text x="30" y="12">{html.escape(title)} (n={sketch["n"]:,})'
            f'</text>{bars}<text x="30" y="{height - 4}">{low:.3g}</text>'
            f'<text x="{width - 40}" y="{height - 4}">{high:.3g}</text></svg>')


def _problem_rows(problems: list[dict]) -> str:
    rows = "".join(f"<tr><td class='bad'>{html.escape(r['status'])}</td><td>{html.escape(r.get('source') or '')}"
                   f"</td><td>{html.escape(r.get('prompt') or '')}</td><td>{html.escape(r.get('error') or '')}</td></tr>"
                   for r in problems)
    return f"<table><tr><th>status</th><th>source</th><th>prompt</th><th>reason</th></tr>{rows}</table>"


def _front_page(output, run: dict, summary: dict, stats: dict, shown: list, images: list, problems: list,
                pages: dict, shard_count: int, chosen: list) -> str:
    config = run.get("config", {})
    settings = ", ".join(f"{k} {config.get(k)}" for k in ("model", "steps", "guidance", "policy", "candidates",
                                                          "keep", "rater", "seed") if k in config)
    by_status = stats["by_status"]
    steps = summary.get("denoising_steps_spent")
    cost = (f"{steps:,} denoising steps spent; best-of-{summary.get('candidates_per_prompt')} would have spent "
            f"{summary.get('denoising_steps_best_of_n', 0):,}" if steps is not None else "")
    reasons = "".join(f"<tr><td>{n:,}</td><td>{html.escape(r)}</td></tr>" for r, n in
                      list(stats["quarantine_reasons"].items()) + list(stats["failure_reasons"].items()))
    difficulty = stats.get("difficulty") or {}
    index = "".join(f"<li><a href='{html.escape(links[0])}'>{html.escape(shard)}</a> ({len(links)} page"
                    f"{'s' if len(links) > 1 else ''})</li>" for shard, links in sorted(pages.items()))
    listed = problems[:LISTED_PROBLEMS]
    return document("seedsift report", f"""<h1>seedsift run report</h1>
<p>{html.escape(_shown_location(output))}<br><span class="muted">{html.escape(settings)}</span></p>
<p><b>{stats['images']:,}</b> images for <b>{stats['prompts']:,}</b> prompts; {by_status.get('failed', 0):,} failed rows
({stats['failures']:,} not yet retried), {by_status.get('quarantined', 0):,} quarantined. {html.escape(cost)}</p>
<h2>Distributions (all rows)</h2>
{_histogram(stats.get('score'), 'rated score')} {_histogram(difficulty.get('spread'), 'predicted spread per prompt')}
{_histogram(difficulty.get('mean'), 'predicted mean per prompt (difficulty)')}
<p class="muted">median rated score {number(quantile(stats.get('score'), 0.5))}</p>
<h2>Images</h2>
<p class="muted">{len(shown):,} of {stats['images']:,} images: every image of {len(chosen)} of {shard_count:,}
shards chosen at random{', then a uniform sample of ' + str(GRID_MAX) if len(shown) >= GRID_MAX else ''}. Every row
is on the shard pages below.</p>
<div class="controls">sort by <select id="sort"><option value="score">rated score</option>
<option value="predicted">predicted score</option><option value="difficulty">prompt difficulty (predicted mean)</option>
<option value="spread">predicted spread</option><option value="prompt">prompt</option></select>
filter <input id="q" placeholder="words in the prompt"></div>
<div class="grid" id="grid">{''.join(_card(r, link) for r, link in zip(shown, images))}</div>
<h2>Quarantined and failed rows</h2>
<table><tr><th>rows</th><th>reason (all rows)</th></tr>{reasons}</table>
<p class="muted">{len(listed):,} of them from the sampled shards listed here; each shard page lists all of its own.</p>
{_problem_rows(listed)}
<h2>Shard pages</h2><ul>{index}</ul>""", STYLE, SCRIPT)


def _write_shard_pages(output: Output, manifest: Manifest, records: dict, open_tables: dict) -> dict[str, list]:
    """Pages listing every row of every shard; a complete shard's pages are written once per shard record."""
    pages = {}
    existing = set(output.list_keys(PAGES, ".html"))
    for shard in sorted(set(records) | set(open_tables)):
        file_key, index = split_shard_id(shard)
        version = (hashlib.blake2b(records[shard].to_json().encode(), digest_size=6).hexdigest()
                   if shard in records else "open")
        first = f"{PAGES}/{file_key}/{index:06d}-{version}-0000.html"
        if shard in records and first in existing:
            pages[shard] = sorted(k for k in existing if k.startswith(f"{PAGES}/{file_key}/{index:06d}-{version}-"))
            continue
        table = open_tables.get(shard) if shard in open_tables else manifest.read_complete(shard, COLUMNS)
        rows = table.to_pylist() if table is not None else []
        keys = []
        count = max(1, -(-len(rows) // PAGE_ROWS))
        for page in range(count):
            key = f"{PAGES}/{file_key}/{index:06d}-{version}-{page:04d}.html"
            chunk = rows[page * PAGE_ROWS:(page + 1) * PAGE_ROWS]
            ok = [r for r in chunk if r["status"] == "ok"]
            bad = [r for r in chunk if r["status"] != "ok"]
            nav = " ".join(f'<a href="{index:06d}-{version}-{p:04d}.html">{p + 1}</a>' if p != page else f"<b>{p + 1}</b>"
                           for p in range(count))
            body = document(shard, f"<p><a href='../../{REPORT_FILE}'>report</a> · shard "
                            f"{html.escape(shard)} · rows {page * PAGE_ROWS + 1}-{page * PAGE_ROWS + len(chunk)} of "
                            f"{len(rows)} · page {nav}</p><div class='grid'>"
                            + "".join(_card(r, _image_link(output, manifest, r, thumbnail=False), prefix="../../")
                                      for r in ok)
                            + "</div>" + (_problem_rows(bad) if bad else ""), STYLE)
            output.write_bytes(key, body.encode("utf-8"))
            keys.append(key)
        stale = [k for k in existing if k.startswith(f"{PAGES}/{file_key}/{index:06d}-") and k not in keys]
        output.delete(stale)
        pages[shard] = keys
    return pages
