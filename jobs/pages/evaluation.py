"""The evaluation's pages: report.html (tables and SVG figures) and the contact sheet (PNG)."""

from __future__ import annotations

import html
import io
import math

import numpy as np

from jobs.pages.html import number as shown
from jobs.pages.html import page as document
from orchestrator.evaluation.figures import render_candidates

CONTACT_SHEET_FILE = "contact_sheet.png"
STYLE = "body{max-width:60em}th{font-weight:600}svg{display:block;margin:1em 0}.note{color:#555}"
SCATTER_MAX_POINTS = 4000  # the scatter plot draws a fixed random subset beyond this, to keep the page small
# Contact sheet layout, in pixels: one row per prompt, candidate 0 (random policy) left, the predictor's pick right.
TILE = 256
MARGIN = 8
LINE = 16
FONT_SIZE = 12


def contact_sheet_size(rows: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with `rows` prompts."""
    return 2 * TILE + 3 * MARGIN, MARGIN + rows * (LINE + TILE + 3 * LINE + MARGIN)


def contact_sheet(model_path: str, identity: dict, text_adapter, groups, predicted: list[np.ndarray],
                  chosen: list[int]) -> tuple[bytes, dict]:
    """PNG of the first held-out prompts (by prompt id, not picked by result): candidate 0, which the random
    policy renders, beside the predictor's top-1, each labelled with its rated score from the dataset."""
    from PIL import Image, ImageDraw, ImageOps

    from actors.predictor.selection import keep_top_k
    from jobs.pages.fonts import text_font

    picks = [keep_top_k(predicted[i], 1)[0] for i in chosen]
    pairs = [[int(groups.seeds[i][0]), int(groups.seeds[i][pick])] for i, pick in zip(chosen, picks)]
    images, render_seconds = render_candidates(model_path, identity, text_adapter, [groups.prompts[i] for i in chosen],
                                               pairs)
    width, height = contact_sheet_size(len(chosen))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = text_font(FONT_SIZE)
    entries = []
    for row, (i, pick) in enumerate(zip(chosen, picks)):
        top = MARGIN + row * (LINE + TILE + 3 * LINE + MARGIN)
        title = f"{groups.prompt_ids[i]}: {groups.prompts[i]}"
        draw.text((MARGIN, top), _fit(draw, title, font, width - 2 * MARGIN), fill="black", font=font)
        scores, guesses = groups.scores[i], predicted[i]
        labels = [("random policy: candidate 0", f"score {scores[0]:.4g} (predicted {guesses[0]:.4g})"),
                  (f"predictor: candidate {pick}" + (" (= candidate 0)" if pick == 0 else ""),
                   f"score {scores[pick]:.4g} (predicted {guesses[pick]:.4g})")]
        for column, (line1, line2) in enumerate(labels):
            left = MARGIN + column * (TILE + MARGIN)
            picture = Image.fromarray(images[2 * row + column])
            resample = Image.NEAREST if max(picture.size) < TILE else Image.LANCZOS
            picture = ImageOps.contain(picture, (TILE, TILE), method=resample)
            sheet.paste(picture, (left + (TILE - picture.width) // 2, top + LINE + (TILE - picture.height) // 2))
            draw.text((left, top + LINE + TILE + 2), _fit(draw, line1, font, TILE), fill="black", font=font)
            draw.text((left, top + 2 * LINE + TILE), _fit(draw, line2, font, TILE), fill="black", font=font)
        lower = bool(scores[pick] < scores[0])
        if lower:  # said plainly: selection is a bet, and this one lost
            draw.text((MARGIN, top + 3 * LINE + TILE), "the predictor's pick rated lower than candidate 0",
                      fill="#b00000", font=font)
        entries.append({"prompt_id": groups.prompt_ids[i], "prompt": groups.prompts[i], "predictor_pick": pick,
                        "pick_score": float(scores[pick]), "candidate0_score": float(scores[0]),
                        "pick_rated_lower": lower})
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue(), {"file": CONTACT_SHEET_FILE, "rows": entries,
                               "render_seconds_per_image": round(render_seconds, 4)}


def _fit(draw, text: str, font, width: int) -> str:
    """The text, cut with "..." so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def report_html(evaluation: dict, actual: list[np.ndarray], predicted: list[np.ndarray]) -> str:
    """A self-contained page: the figures, a predicted-vs-rated scatter, the gain curve and the contact sheet."""

    def number(value, digits: int = 3) -> str:
        return shown(value, digits, fixed=True, missing="n/a")

    e = evaluation
    count = e["candidates"]
    ndcg = "; ".join(f"@{depth}: {number(value)}" for depth, value in e["ndcg"].items())
    rows = [
        ("prompts evaluated", f"{e['prompts']} ({e['split']} split; {e['prompts_incomplete']} incomplete left out)"),
        ("candidates per prompt (N)", count),
        ("model / scheduler", f"{e['model']} / {e['scheduler']}"),
        ("steps, guidance, size", f"{e['steps']}, {e['guidance']}, {e['width']}x{e['height']}"),
        ("rater", e["rater"]),
        ("Spearman, all rows", number(e["spearman_global"])),
        ("Spearman per prompt: mean / median", f"{number(e['spearman_per_prompt_mean'])} / "
                                                f"{number(e['spearman_per_prompt_median'])}"),
        ("NDCG (relevance: rated score min-max scaled per prompt)", ndcg),
        (f"top-1-of-{count} gain over a random seed", f"{number(e['top1_gain'], 4)} rater units; "
                                                      f"{number(e['top1_gain_std_units'])} per-prompt std"),
        ("P(pick the true best)", f"{number(e['p_pick_best'])} (chance {number(e['p_pick_best_chance'])})"),
        (f"mean score: predictor top-1 of {count} / random / best of {count}",
         f"{number(e['predictor_top1_mean'], 4)} / {number(e['random_mean'], 4)} / "
         f"{number(e['oracle_best_of_n_mean'], 4)}"),
        ("compute saved", e["compute_saved_note"]),
        ("prompt-swap control (each prompt scored with another prompt's embedding)",
         "not measured (one prompt)" if not e.get("prompt_swap") else
         f"per-prompt Spearman {number(e['prompt_swap']['spearman_per_prompt_mean'])}; top-1 gain "
         f"{number(e['prompt_swap']['top1_gain_std_units'])} per-prompt std, "
         f"{number(e['prompt_swap']['gain_kept'])} of the gain kept; same pick on "
         f"{number(e['prompt_swap']['same_top1_share'])} of prompts"),
        ("scorer cost", f"{number(e['scoring_seconds_per_prompt'], 4)} s per prompt for N noises; one render "
                        f"{number(e.get('render_seconds_per_image'), 3)} s on this machine "
                        f"(scoring = {number(e.get('scoring_cost_in_renders'), 3)} renders)"),
    ]
    table = "\n".join(f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(value))}</td></tr>"
                      for name, value in rows)
    contact = ""
    if e.get("contact_sheet"):
        contact = (f"<h2>Contact sheet</h2><p>The first {len(e['contact_sheet']['rows'])} evaluated prompts by id "
                   "(not chosen by result): left, candidate 0, what the random policy renders; right, the "
                   f"predictor's pick of {count}. Scores are the dataset's ratings.</p>"
                   f'<img src="{CONTACT_SHEET_FILE}" alt="contact sheet">')
    return document("seedsift evaluation", f"""<h1>seedsift evaluation</h1>
<p class="note">Predictor {html.escape(str(e['predictor']))} on {html.escape(str(e['dataset']))}.</p>
<table>
{table}
</table>
<h2>Predicted vs rated</h2>
<p class="note">Left: raw scores, every row. Right: both centred on their prompt's mean, which removes how good a
prompt is overall and shows what selection uses: the order of one prompt's candidates.</p>
{scatter_svg(actual, predicted)}
<h2>Mean score against candidates seen (n)</h2>
<p class="note">From the first n candidates of each prompt (what a run with --candidates n sees). Predictor: its
top-1 of n, 1 render. Random: one random seed, 1 render. Oracle: render all n, rate, keep the best: n renders.</p>
{curve_svg(e['gain_curve'])}
<h2>Mean score against denoising steps per delivered image</h2>
<p class="note">What each policy spends for one image. Random and the predictor's top-1 render once (the schedule's
steps); best of n renders n seeds in full; the preview policy runs the predictor's best M candidates for T steps,
rates their predicted final images and continues only the best: M&times;T + (steps &minus; T).</p>
{cost_svg(e['cost_curve'])}
{cost_table(e['cost_curve'])}
{contact}""", STYLE)


def cost_table(cost: dict) -> str:
    def label(point: dict) -> str:
        return {"random": "random seed", "predictor": "predictor top-1",
                "best_of_n": f"best of {point.get('n')}",
                "preview": f"preview {point.get('m')}x{point.get('t')}"}[point["policy"]]

    rows = "".join(f"<tr><td>{html.escape(label(p))}</td><td>{p['steps']}</td>"
                   f"<td>{p['share_of_best_of_n_steps']:.3f}</td><td>{p['mean_score']:.4f}</td></tr>"
                   for p in sorted(cost["points"], key=lambda p: p["steps"]))
    return ("<table><tr><th>policy</th><th>steps per image</th>"
            f"<th>share of best-of-{cost['best_of_n']} steps</th><th>mean rated score</th></tr>{rows}</table>")


def cost_svg(cost: dict) -> str:
    """Mean rated score against steps per delivered image (log2 axis): best-of-n as a line, the rest as points."""
    width, height, left, top, plot_w, plot_h = 720, 340, 70, 20, 420, 260
    points = cost["points"]
    xs = np.array([p["steps"] for p in points], dtype=np.float64)
    x0, x1 = math.log2(xs.min()) - 0.2, math.log2(xs.max()) + 0.2
    y0, y1 = _axis_range(np.array([p["mean_score"] for p in points]))

    def xy(steps: float, value: float) -> tuple[float, float]:
        return (left + (math.log2(steps) - x0) / (x1 - x0) * plot_w,
                top + plot_h - (value - y0) / (y1 - y0) * plot_h)

    colours = {"best_of_n": "#1f77b4", "random": "#7f7f7f", "predictor": "#d62728", "preview": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             'font-family="sans-serif">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    best = sorted((p for p in points if p["policy"] == "best_of_n"), key=lambda p: p["steps"])
    parts.append('<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="'
                 + " ".join("{:.1f},{:.1f}".format(*xy(p["steps"], p["mean_score"])) for p in best) + '"/>')
    for point in points:
        x, y = xy(point["steps"], point["mean_score"])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colours[point["policy"]]}"/>')
        if point["policy"] == "preview":
            parts.append(f'<text x="{x + 5:.1f}" y="{y - 5:.1f}">{point["m"]}x{point["t"]}</text>')
        elif point["policy"] == "best_of_n":
            parts.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle" fill="#1f77b4">{point["n"]}</text>')
    for steps in sorted({p["steps"] for p in best}):
        x, _ = xy(steps, y0)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{steps}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                 "denoising steps per delivered image (log scale)</text>")
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y0:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>')
    parts.append(f'<text transform="translate({left - 45},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 "mean rated score</text>")
    for row, (key, label) in enumerate((("best_of_n", "best of n (numbers: n)"), ("random", "random seed"),
                                        ("predictor", "predictor top-1"), ("preview", "preview MxT"))):
        ly = top + 12 + row * 18
        parts.append(f'<circle cx="{left + plot_w + 20}" cy="{ly - 4}" r="3.5" fill="{colours[key]}"/>')
        parts.append(f'<text x="{left + plot_w + 30}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axis_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(np.min(values)), float(np.max(values))
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def _panel(x: np.ndarray, y: np.ndarray, left: float, title: str, x_label: str, y_label: str,
           size: int = 300, top: int = 30) -> str:
    """One scatter panel: points, a frame, min/max ticks and labels, as SVG elements."""
    (x0, x1), (y0, y1) = _axis_range(x), _axis_range(y)
    px = left + (x - x0) / (x1 - x0) * size
    py = top + size - (y - y0) / (y1 - y0) * size
    dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2"/>' for a, b in zip(px, py))
    bottom = top + size
    return (f'<text x="{left + size / 2}" y="{top - 10}" text-anchor="middle" font-weight="600">'
            f'{html.escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#999"/>'
            f'<g fill="#1f77b4" fill-opacity="0.45">{dots}</g>'
            f'<text x="{left}" y="{bottom + 14}">{x0:.3g}</text>'
            f'<text x="{left + size}" y="{bottom + 14}" text-anchor="end">{x1:.3g}</text>'
            f'<text x="{left + size / 2}" y="{bottom + 30}" text-anchor="middle">{html.escape(x_label)}</text>'
            f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>'
            f'<text transform="translate({left - 40},{top + size / 2}) rotate(-90)" text-anchor="middle">'
            f'{html.escape(y_label)}</text>')


def scatter_svg(actual: list[np.ndarray], predicted: list[np.ndarray]) -> str:
    """Two panels in one SVG: rated against predicted, raw and centred per prompt (a fixed subset if very many)."""
    raw_x, raw_y = np.concatenate(predicted), np.concatenate(actual)
    centred_x = np.concatenate([p - p.mean() for p in predicted])
    centred_y = np.concatenate([a - a.mean() for a in actual])
    if len(raw_x) > SCATTER_MAX_POINTS:
        subset = np.random.default_rng(0).choice(len(raw_x), SCATTER_MAX_POINTS, replace=False)
        raw_x, raw_y, centred_x, centred_y = raw_x[subset], raw_y[subset], centred_x[subset], centred_y[subset]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="760" height="380" font-size="11" '
            'font-family="sans-serif">'
            + _panel(raw_x, raw_y, 60, "raw", "predicted score", "rated score")
            + _panel(centred_x, centred_y, 440, "centred per prompt", "predicted - prompt mean", "rated - prompt mean")
            + "</svg>")


def curve_svg(curve: list[dict]) -> str:
    """Mean rated score against n (log2 axis) for the predictor's top-1, a random seed and best-of-n."""
    width, height, left, top, plot_w, plot_h = 720, 340, 70, 20, 400, 260
    lines = (("predictor", "#d62728", "predictor top-1 of n (1 render)"),
             ("random", "#7f7f7f", "random seed (1 render)"),
             ("oracle", "#1f77b4", "best of n (n renders)"))
    ns = [point["n"] for point in curve]
    values = np.array([point[key] for point in curve for key, _, _ in lines], dtype=np.float64)
    y0, y1 = _axis_range(values)
    span = math.log2(max(ns)) or 1.0

    def xy(n: int, value: float) -> tuple[float, float]:
        return left + math.log2(n) / span * plot_w, top + plot_h - (value - y0) / (y1 - y0) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             'font-family="sans-serif">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for n in ns:
        x, _ = xy(n, y0)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{n}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                 "candidates seen per prompt (n)</text>")
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y0:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>')
    parts.append(f'<text transform="translate({left - 45},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 "mean rated score</text>")
    for row, (key, colour, label) in enumerate(lines):
        points = [xy(point["n"], point[key]) for point in curve]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
        ly = top + 12 + row * 18
        parts.append(f'<line x1="{left + plot_w + 12}" y1="{ly - 4}" x2="{left + plot_w + 30}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + plot_w + 34}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
