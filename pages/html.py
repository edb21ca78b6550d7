"""The page: sections of escaped text, tables, inline SVG figures and token heat-maps in one
self-contained HTML file (inline CSS and JavaScript, no network). Every string from a run (prompt
text, tokens, samples, file names) goes through `esc`; the heat-map's numbers travel as JSON in a
<script type="application/json"> block and the script only sets colours and titles."""
import html
import json
import math
from typing import List

import pandas as pd

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; margin-top: 32px; }
h3 { font-size: 15px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
td.text, th.text { text-align: left; white-space: pre-wrap; max-width: 520px; }
figure.plot { margin: 8px 0; display: inline-block; }
figure.plot svg { max-width: 100%; height: auto; }
figcaption, .files { color: #666; font-size: 12px; }
.facts td { text-align: left; }
.prompt { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap;
          border: 1px solid #eee; padding: 6px; margin: 6px 0; line-height: 1.9; }
.tok { border-radius: 2px; }
.legend { font-size: 12px; color: #444; }
.heat-key { display: inline-flex; align-items: center; gap: 6px; font-size: 12px; margin: 4px 0; }
.heat-bar { display: inline-block; width: 220px; height: 12px; border: 1px solid #ccc;
            background: linear-gradient(to right, rgba(31, 119, 180, 0.9),
              rgba(31, 119, 180, 0.08) 50%, rgba(214, 39, 40, 0.08) 50%, rgba(214, 39, 40, 0.9)); }
"""

SCRIPT = """
(function () {
  function colour(z) {
    var a = Math.min(1, Math.abs(z));
    return z >= 0 ? 'rgba(214, 39, 40, ' + (0.08 + 0.82 * a).toFixed(3) + ')'
                  : 'rgba(31, 119, 180, ' + (0.08 + 0.82 * a).toFixed(3) + ')';
  }
  function paint(box, data, layer) {
    var scores = data.scores[String(layer)];
    var centre = data.centre[String(layer)], scale = data.scale[String(layer)];
    var what = data.calibrated ? 'margin' : 'minus the median';
    box.querySelectorAll('.prompt').forEach(function (p, j) {
      p.querySelectorAll('.tok').forEach(function (t, k) {
        var s = scores[j][k];
        t.style.backgroundColor = colour((s - centre) / scale);
        t.title = 'layer ' + layer + ', token ' + k + ': score ' + s.toFixed(4) + ' (' + what +
          ' ' + (s - centre).toFixed(4) + ')';
      });
    });
    box.querySelector('.heat-layer-shown').textContent = layer;
    box.querySelector('.heat-lo').textContent = (-scale).toPrecision(3);
    box.querySelector('.heat-hi').textContent = '+' + scale.toPrecision(3);
    box.querySelector('.heat-centre').textContent = centre.toPrecision(4);
  }
  document.querySelectorAll('.heatmap').forEach(function (box) {
    var data = JSON.parse(box.querySelector('script.heat-data').textContent);
    var pickLayer = box.querySelector('select.heat-layer');
    pickLayer.addEventListener('change', function () { paint(box, data, pickLayer.value); });
    paint(box, data, pickLayer.value);
  });
})();
"""


def esc(text) -> str:
    """Text made safe as HTML content or attribute value."""
    return html.escape(str(text), quote=True)


def cell(v) -> str:
    if isinstance(v, bool):
        return esc(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return esc(v)


def table(df: pd.DataFrame, cols: List[str] = None, text_cols=(), cls: str = "") -> str:
    """An HTML table of df's columns `cols` (floats shown to 3 decimals, text escaped)."""
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{esc(c)}</th>' for c in cols)
    values = {c: df[c].tolist() for c in cols}  # each column its own dtype (ints stay ints)
    body = []
    for i in range(len(df)):
        body.append("<tr>" + "".join(
            f'<td class="{"text" if c in text_cols else ""}">{cell(values[c][i])}</td>'
            for c in cols) + "</tr>")
    return f'<table class="{esc(cls)}"><tr>{head}</tr>{"".join(body)}</table>'


def facts(items) -> str:
    """A two-column table of (name, value) facts."""
    rows = "".join(f'<tr><th class="text">{esc(k)}</th><td class="text">{esc(v)}</td></tr>'
                   for k, v in items if v is not None)
    return f'<table class="facts">{rows}</table>'


def figure(name: str, svg: str, caption: str) -> str:
    """An inline SVG plot (matplotlib's own output, not user text) with an escaped caption."""
    return (f'<figure class="plot" data-plot="{esc(name)}">{svg}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def files_note(run_path: str, files: List[str]) -> str:
    return (f'<p class="files">Numbers from {esc(run_path)}: '
            + ", ".join(f"<code>{esc(f)}</code>" for f in files) + "</p>")


def heatmap(tm, index: int) -> str:
    """The heat-map of a pages.heatmap.TokenMap: a layer selector, a colour key, one
    <span class="tok"> per token (escaped text), scores as JSON. A probe's tokens are coloured by
    their margin over its decision threshold (as the playground colours probe_margins), a
    vector's around the median of the shown tokens; the colour's strength is the distance from
    that centre over the largest such distance among the shown tokens at positions >= 1."""
    import numpy as np

    calibrated = bool(tm.thresholds)
    centre, scale = {}, {}
    for l, per in tm.scores.items():
        body = np.concatenate([s[1:] if len(s) > 1 else s for s in per]).astype(np.float64)
        c = float(tm.thresholds[l]) if calibrated else float(np.median(body))
        spread = float(np.max(np.abs(body - c))) if body.size else 0.0
        centre[str(l)], scale[str(l)] = c, spread if spread > 0 else 1.0
    data = {"layers": tm.layers, "centre": centre, "scale": scale, "calibrated": calibrated,
            "scores": {str(l): [[round(float(x), 5) for x in s] for s in per]
                       for l, per in tm.scores.items()}}
    blob = json.dumps(data).replace("</", "<\\/")
    options = "".join(f'<option value="{l}"{" selected" if l == tm.default_layer else ""}>'
                      f"{l}</option>" for l in tm.layers)
    prompts = []
    for pid, cls, toks in tm.prompts:
        spans = "".join(f'<span class="tok">{esc(t)}</span>' for t in toks)
        prompts.append(f'<h3>prompt {esc(pid)} ({esc(cls)}), {len(toks)} tokens</h3>'
                       f'<div class="prompt" data-tokens="{len(toks)}">{spans}</div>')
    if calibrated:
        meaning = ("Each token coloured by the probe's margin at that layer: its score (x . "
                   "weight + bias, the server's probe_scores) minus the probe's decision "
                   "threshold <span class=\"heat-centre\"></span> (the server's probe_margins). "
                   f"Red: above the threshold, the probe's positive side ({esc(tm.positive)}); "
                   "blue: below.")
        trained = (f'<p class="legend heat-text">The probe was trained on: {esc(tm.text)}. It '
                   "reads text of that form; other text (a bare statement without the chat "
                   "template, say) can score on either side.</p>" if tm.text else "")
    else:
        meaning = ("Each token coloured by x . direction at that layer around the median of the "
                   "shown tokens (<span class=\"heat-centre\"></span>): red above, blue below "
                   "(a vector has no decision threshold).")
        trained = ""
    key = ('<span class="heat-key">colour key: <span class="heat-lo"></span>'
           '<span class="heat-bar" title="margin, from most negative to most positive"></span>'
           '<span class="heat-hi"></span></span>')
    return (f'<div class="heatmap" id="heatmap-{index}">'
            f'<script type="application/json" class="heat-data">{blob}</script>'
            f'<p class="legend">layer <select class="heat-layer">{options}</select> '
            f'(shown: <span class="heat-layer-shown"></span>). {meaning} Strength: the distance '
            f'from the centre over the largest among the shown tokens (position 0, the attention '
            f'sink, left out of the scale); hover a token for its score. Cache {esc(tm.cache)}, '
            f'side {esc(tm.side)}; direction {esc(tm.direction)}.</p>{key}{trained}'
            f'{"".join(prompts)}</div>')


def page(title: str, sections: List[tuple]) -> str:
    """The whole document: sections are (heading, inner HTML)."""
    body = "".join(f"<section><h2>{esc(h)}</h2>{inner}</section>" for h, inner in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{esc(title)}</h1>{body}<script>{SCRIPT}</script></body></html>")
