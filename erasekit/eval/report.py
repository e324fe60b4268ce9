"""The evaluation report: one self-contained HTML page (images as base64 PNG, plots as inline SVG).

The table of metrics, plots (erase rate per category, SSR-N against N, preservation), and a base | erased
grid per prompt. Images NudeNet flags are pixelated in the file itself by default (the page can be shared
or uploaded as it is); the toy judge's flags are outlined, not hidden, because a red circle is no secret.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from .cache import write_atomic

PIXEL_BLOCK = 16  # px cells of a censored image: nothing recognisable is left at this size
THUMB = 256  # px, the longest side of an image in the page: a 200-prompt run of 512 px photos stays tens of MB
MAX_SEEDS = 4  # base | erased pairs shown per prompt (every seed counts in the figures)
BAR = "#c0392b"
BASE = "#7f8c8d"


def write_report(path: str, result: dict, censor: bool = True, max_prompts: int = 200) -> str:
    """Write the page for a :func:`erasekit.eval.harness.run` result (atomically); returns ``path``."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return write_atomic(path, render(result, censor, max_prompts).encode("utf-8"))


def render(result: dict, censor: bool = True, max_prompts: int = 200) -> str:
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    rows, images, findings = result["_rows"], result["_images"], result["_findings"]
    hide = censor and public.get("detector") == "nudenet"
    parts = [_HEAD, "<h1>Erasure evaluation</h1>", _subtitle(public), _metrics_table(public),
             '<section id="plots"><h2>Plots</h2><div class="plots">',
             _bar_svg("erase-rate-plot", "Erase rate per category",
                      {c: v["erase_rate"] for c, v in public["per_category"].items()} or {"all": public["erase_rate"]}),
             _ssr_svg(public), _preservation_svg(public), "</div></section>",
             f'<section id="grids"><h2>Base | erased, per prompt</h2><p class="note">{_grid_note(public, hide)}</p>']
    for i, row in enumerate(rows[:max_prompts]):
        parts.append(_prompt_grid(i, row, images["base"][i], images["erased"][i], findings["base"][i],
                                  findings["erased"][i], hide))
    if len(rows) > max_prompts:
        parts.append(f'<p class="note">{len(rows) - max_prompts} more prompts are in the JSON figures, not shown.</p>')
    if any(len(per) > MAX_SEEDS for per in images["base"]):
        parts.append(f'<p class="note">The first {MAX_SEEDS} seeds of each prompt are shown; the figures count them all.</p>')
    parts.append("</section>")
    parts.append(f'<details><summary>Every figure (JSON)</summary><pre id="json">{html.escape(json.dumps(public, indent=1))}'
                 "</pre></details></body></html>")
    return "\n".join(parts)


_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Erasure evaluation</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:16px}.note{color:#555;font-size:90%}
.prompt{margin:14px 0;padding:8px;border-top:1px solid #ddd}.prompt h3{font-size:100%;margin:0 0 6px}
.pairs{display:flex;flex-wrap:wrap;gap:12px}.pair{display:flex;gap:2px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:75%}
img{width:128px;height:128px;image-rendering:pixelated;border:3px solid transparent}
img.unsafe{border-color:#c0392b}#preservation td:last-child{text-align:left}.cats{color:#777;font-weight:normal}
</style></head><body>"""


def _subtitle(r: dict) -> str:
    what = []
    if r.get("loras"):
        what.append("LoRA " + ", ".join(f"{p.rsplit('/', 1)[-1]} at {s:g}" for p, s in r["loras"]))
    if r.get("dag"):
        what.append(f"Detect-and-Guide ({r['dag'].rsplit('/', 1)[-1]}, strength {r['dag_settings']['strength']:g})")
    det = r["detector"] + (f" ({r['concept']})" if r.get("concept") else
                           f" ({', '.join(r.get('classes', []))} at {r.get('threshold')})")
    return (f'<p id="subtitle">Model <code>{html.escape(r["model"])}</code>, erased with {html.escape(" + ".join(what))}. '
            f'{r["prompts_total"]} prompts x {len(r["seeds"])} seeds, {html.escape(r["sampler"])}; detector: '
            f'{html.escape(det)}.</p>')


def _fmt(v) -> str:
    return "&ndash;" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


def _metrics_table(r: dict) -> str:
    ssr_head = "".join(f"<th>SSR-{n}</th>" for n in r["ssr"])
    head = f"<tr><th>prompts</th><th>n</th><th>erase rate</th><th>erase rate (images)</th><th>ASR</th><th>ASR base</th>{ssr_head}</tr>"

    def line(name, b):
        ssr = "".join(f"<td>{_fmt(b['ssr'].get(n))}</td>" for n in r["ssr"])
        return (f"<tr><td>{html.escape(name)}</td><td>{b.get('prompts', b.get('unsafe_prompts'))}</td><td>{_fmt(b['erase_rate'])}</td>"
                f"<td>{_fmt(b['erase_rate_images'])}</td><td>{_fmt(b['asr'])}</td><td>{_fmt(b['asr_base'])}</td>{ssr}</tr>")

    body = line("all unsafe prompts", r) + "".join(line(c, b) for c, b in r["per_category"].items())
    kept = (f"<tr><td>preservation</td><td>{_fmt(r['preservation'])}</td><td>{html.escape(r['preservation_measure'])}, "
            f"on {html.escape(r['preservation_on'])}</td></tr>"
            f"<tr><td>SSIM to base</td><td>{_fmt(r['ssim'])}</td><td>mean, same seed</td></tr>"
            f"<tr><td>identical to base</td><td>{_fmt(r['identical'])}</td><td>share of images unchanged (at most 1/255 apart)</td></tr>"
            f"<tr><td>benign ASR</td><td>{_fmt(r['benign']['asr'])}</td><td>base: {_fmt(r['benign']['asr_base'])}</td></tr>"
            + (f"<tr><td>CLIP score</td><td>{_fmt(r['clip_score'])}</td><td>base: {_fmt(r['clip_score_base'])}; benign "
               f"prompts {_fmt(r['clip_score_benign'])} (base {_fmt(r['clip_score_benign_base'])}); 100 max(cos, 0), "
               f"Hessel et al. 2021</td></tr>" if "clip_score" in r else "")
            + f"<tr><td>overhead ratio</td><td>{_fmt(r.get('overhead_ratio'))}</td><td>(detector + bookkeeping) / sampling, "
            f"per image</td></tr>")
    return (f'<section><h2>Metrics</h2><table id="metrics">{head}{body}</table>'
            f'<table id="preservation">{kept}</table>'
            '<p class="note">Erase rate: DAG Sec. 4, 1 - unsafe findings erased / base; (images): over images unsafe '
            'in the base run. ASR: share of images judged unsafe (NCD App. B). SSR-N: share of prompts with an unsafe '
            'image among the first N seeds (NCD Eq. 12).</p></section>')


def _bar_svg(elem_id: str, title: str, values: dict, colour: str = BAR) -> str:
    items = list(values.items())
    w, bar_h, left = 420, 22, 150
    h = 30 + bar_h * len(items) + 20
    out = [f'<svg id="{elem_id}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
           f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for k, (name, v) in enumerate(items):
        y = 28 + k * bar_h
        length = 0 if v is None else max(0.0, min(1.0, v)) * (w - left - 50)
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{html.escape(str(name))[:24]}</text>'
                   f'<rect class="bar" x="{left}" y="{y + 3}" width="{length:.1f}" height="{bar_h - 6}" fill="{colour}"/>'
                   f'<text x="{left + length + 4:.1f}" y="{y + 14}" font-size="11">{_fmt(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def _ssr_svg(r: dict) -> str:
    ns = [int(n) for n in r["ssr"]]
    w, h, pad = 320, 200, 36
    out = [f'<svg id="ssr-plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
           '<text x="4" y="16" font-size="13" font-weight="bold">SSR-N against N</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#999"/>',
           f'<line x1="{pad}" y1="30" x2="{pad}" y2="{h - pad}" stroke="#999"/>',
           f'<text x="{pad - 4}" y="34" font-size="10" text-anchor="end">1</text>',
           f'<text x="{pad - 4}" y="{h - pad}" font-size="10" text-anchor="end">0</text>']
    if not ns:
        out.append(f'<text x="{pad + 10}" y="{h / 2}" font-size="11">needs at least 1 seed</text></svg>')
        return "".join(out)

    def xy(i, v):
        x = pad + (w - pad - 20) * (i / max(len(ns) - 1, 1))
        return x, (h - pad) - (h - pad - 30) * (v or 0)

    for key, colour, label in (("ssr_base", BASE, "base"), ("ssr", BAR, "erased")):
        pts = [xy(i, r[key].get(str(n))) for i, n in enumerate(ns)]
        out.append(f'<polyline class="{key}" fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        out.append(f'<text x="{pts[-1][0] - 4:.1f}" y="{pts[-1][1] - 6:.1f}" font-size="10" fill="{colour}" '
                   f'text-anchor="end">{label}</text>')
    for i, n in enumerate(ns):
        out.append(f'<text x="{xy(i, 0)[0]:.1f}" y="{h - pad + 14}" font-size="10" text-anchor="middle">N={n}</text>')
    out.append("</svg>")
    return "".join(out)


def _preservation_svg(r: dict) -> str:
    vals = {"preservation": r["preservation"], "SSIM to base": r["ssim"], "identical": r["identical"]}
    if r.get("preservation_unsafe_prompts") is not None:
        vals["kept on unsafe prompts"] = r["preservation_unsafe_prompts"]
    return _bar_svg("preservation-plot", "What the erasure kept", vals, "#2e86c1")


def _grid_note(r: dict, hide: bool) -> str:
    if hide:
        return (f"Images NudeNet flags ({', '.join(r.get('classes', []))} at {r.get('threshold')}) are pixelated in this "
                "file; regenerate with --uncensored to see them. Red frame: judged unsafe.")
    return "Red frame: judged unsafe."


def _prompt_grid(i, row, base, erased, fb, fe, hide: bool) -> str:
    cats = f' <span class="cats">[{html.escape(", ".join(row.categories))}]</span>' if row.categories else ""
    pairs = []
    for s, (a, b, f1, f2) in enumerate(list(zip(base, erased, fb, fe))[:MAX_SEEDS]):
        pairs.append('<div class="pair">' + _figure(a, f1, f"base, seed {s + 1}", hide)
                     + _figure(b, f2, f"erased, seed {s + 1}", hide) + "</div>")
    return (f'<div class="prompt" data-prompt="{i}"><h3>{i + 1}. {html.escape(row.prompt)}{cats}</h3>'
            f'<div class="pairs">{"".join(pairs)}</div></div>')


def _figure(image: np.ndarray, finding, caption: str, hide: bool) -> str:
    from .nudenet import pixelate

    censored = hide and finding.unsafe
    shown = pixelate(image, max(2, min(image.shape[:2]) // PIXEL_BLOCK)) if censored else image
    cls = " ".join(c for c, on in (("unsafe", finding.unsafe), ("censored", censored)) if on)
    title = ", ".join(dict.fromkeys(finding.classes)) or "nothing unsafe found"
    return (f'<figure><img class="{cls}" alt="{html.escape(caption)}" title="{html.escape(title)}" '
            f'src="{data_url(shown)}"><figcaption>{html.escape(caption)}'
            f'{" (pixelated)" if censored else ""}</figcaption></figure>')


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The image as the page holds it: at most THUMB px on its longest side (area-averaged)."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= THUMB:
        return image
    scale = THUMB / max(h, w)
    im = Image.fromarray(np.ascontiguousarray(image)).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                             Image.Resampling.BOX)
    return np.asarray(im)


def data_url(image: np.ndarray) -> str:
    """A data: URL of the thumbnail: PNG up to 128 px (the toy's exact pixels), JPEG (quality 90) above."""
    from PIL import Image

    small = thumbnail(image)
    buf = io.BytesIO()
    fmt = "PNG" if max(small.shape[:2]) <= 128 else "JPEG"
    Image.fromarray(np.ascontiguousarray(small)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
