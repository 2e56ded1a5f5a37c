"""The monitor's dashboard: one self-contained HTML page (inline SVG, no script, no CDN) read from the state file.

    nnforge app monitor dashboard runs/monitor/example/state.db [--out dashboard.html] [--serve --port 8010]
    python -c "from nnforge.apps.monitor.dashboard import render; print(render('state.db'))" > dashboard.html

Per topic: volume per window (bars, negative items darker) and mean sentiment (a line on [-1, 1]) over the last
SHOWN_WINDOWS windows, a red marker on every window that raised an alert; then the alerts, newest first, each with
the headlines behind it. The monitor rewrites the file as it runs and its HTTP endpoint serves it at /; `refresh_s`
makes the browser reload it by itself.
"""

from __future__ import annotations

from pathlib import Path

from nnforge.apps.monitor.state import State
from nnforge.apps.monitor.streams import iso
from nnforge.evaluation._html import esc, na, page

SHOWN_WINDOWS = 240
SHOWN_ALERTS = 100
W, H, PAD = 920, 170, 36  # px: chart size and the left margin for the axis labels

EXTRA_CSS = """
svg.chart { width: 100%; height: auto; background: #fff; }
svg .vol { fill: #afb8c1; } svg .vneg { fill: #cf222e; opacity: .7; }
svg .line { fill: none; stroke: #0969da; stroke-width: 1.6; }
svg .zero { stroke: #d1d9e0; stroke-dasharray: 3 3; }
svg .alert { fill: #cf222e; } svg text { font-size: 11px; fill: #59636e; }
.kind { font-weight: 600; text-transform: uppercase; font-size: 12px; color: #cf222e; }
ul.headlines { margin: 4px 0 10px 18px; padding: 0; } ul.headlines li { margin: 2px 0; }
"""


def _chart(topic: str, windows: list, alerts: dict[float, list[str]], window_s: float) -> str:
    if not windows:
        return na(f"No items in {topic} yet.")
    starts = [w[0] for w in windows]
    t0, t1 = starts[0], starts[-1] + window_s
    span = max(t1 - t0, window_s)
    top = max(w[1] for w in windows) or 1
    plot_w, plot_h = W - PAD - 8, H - 30

    def x(t: float) -> float:
        return PAD + (t - t0) / span * plot_w

    bar_w = max(1.0, plot_w * window_s / span - 1)
    parts = [f'<line class="zero" x1="{PAD}" x2="{W - 8}" y1="{10 + plot_h / 2:.1f}" y2="{10 + plot_h / 2:.1f}"/>']
    for start, count, negative, mean in windows:
        h, hn = plot_h * count / top, plot_h * negative / top
        parts.append(f'<rect class="vol" x="{x(start):.1f}" y="{10 + plot_h - h:.1f}" width="{bar_w:.1f}" '
                     f'height="{h:.1f}"><title>{esc(iso(start))}: {count} items, {negative} negative, mean '
                     f"{mean:+.2f}</title></rect>")
        if negative:
            parts.append(f'<rect class="vneg" x="{x(start):.1f}" y="{10 + plot_h - hn:.1f}" width="{bar_w:.1f}" '
                         f'height="{hn:.1f}"/>')
    points = " ".join(f"{x(s) + bar_w / 2:.1f},{10 + plot_h / 2 * (1 - m):.1f}" for s, c, _, m in windows if c)
    parts.append(f'<polyline class="line" points="{points}"/>')
    for start, kinds in alerts.items():
        if t0 <= start < t1:
            cx = x(start) + bar_w / 2
            parts.append(f'<path class="alert" data-window="{esc(iso(start))}" d="M{cx - 5:.1f},4 L{cx + 5:.1f},4 '
                         f'L{cx:.1f},13 Z"><title>{esc(iso(start))}: {esc(", ".join(kinds))}</title></path>')
    parts.append(f'<text x="2" y="16">{top}</text><text x="2" y="{10 + plot_h:.0f}">0</text>'
                 f'<text x="{PAD}" y="{H - 4}">{esc(iso(t0)[:16])}</text>'
                 f'<text x="{W - 8}" y="{H - 4}" text-anchor="end">{esc(iso(t1)[:16])}</text>')
    return (f'<svg class="chart" data-topic="{esc(topic)}" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{esc(topic)}: volume and sentiment per window">{"".join(parts)}</svg>')


def render(state_path: str | Path, refresh_s: int = 0) -> str:
    st = State(state_path, readonly=True)
    try:
        return _render(st, refresh_s)
    finally:
        st.close()


def _render(st: State, refresh_s: int) -> str:
    ws = st.window_s
    counts = {k: int(st.meta(k) or 0) for k in ("items", "duplicates", "late", "future")}
    alerts = st.alerts(SHOWN_ALERTS)
    by_topic: dict[str, dict[float, list[str]]] = {}  # topic -> window start -> kinds, for the markers
    for topic, kind, start in st.db.execute("SELECT topic, kind, start FROM alerts"):
        by_topic.setdefault(topic, {}).setdefault(start, []).append(kind)
    n_alerts = sum(len(k) for t in by_topic.values() for k in t.values())
    topics = [r[0] for r in st.db.execute("SELECT topic FROM windows GROUP BY topic ORDER BY topic = 'all' DESC, "
                                          "sum(count) DESC, topic")]
    mark = st.watermark
    cards = "".join(f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in (
        ("items counted", f"{counts['items']:,}"), ("alerts", f"{n_alerts:,}"),
        ("topics", len(topics)), ("window", _duration(ws)), ("duplicates skipped", f"{counts['duplicates']:,}"),
        ("late items", f"{counts['late']:,}"), ("latest item", iso(mark)[:16].replace("T", " ") if mark else "-")))
    charts = []
    for topic in topics:
        rows = list(st.db.execute("SELECT start, count, negative, sum_score FROM windows WHERE topic = ? "
                                  "ORDER BY start DESC LIMIT ?", (topic, SHOWN_WINDOWS)))
        rows.reverse()
        filled = _with_empty(rows, ws)
        raised = sum(len(v) for v in by_topic.get(topic, {}).values())
        charts.append(f'<section class="topic" id="topic-{esc(topic)}"><h2>{esc(topic)} <span class="muted">'
                      f'{sum(r[1] for r in rows):,} items, {raised} alert(s)</span></h2>'
                      f"{_chart(topic, filled, by_topic.get(topic, {}), ws)}</section>")
    items = []
    for a in alerts:
        heads = "".join(f'<li>{esc(h["text"])} <span class="muted">({h["score"]:+.2f}, {esc(h["time"][:16])})'
                        f"</span></li>" for h in a.get("headlines", []))
        items.append(f'<div class="alert-row" data-topic="{esc(a["topic"])}" data-kind="{esc(a["kind"])}">'
                     f'<span class="kind">{esc(a["kind"])}</span> <b>{esc(a["topic"])}</b> '
                     f'<span class="muted">{esc(a["window"][0][:16])} to {esc(a["window"][1][:16])}</span><br>'
                     f'{esc(a["message"])}<details><summary>{len(a.get("headlines", []))} headlines behind it'
                     f'</summary><ul class="headlines">{heads}</ul></details></div>')
    alerts_html = "".join(items) if items else na("No alerts yet.")
    body = (f'<section id="summary"><div class="cards">{cards}</div></section>{"".join(charts) or na("No items yet.")}'
            f'<section id="alerts"><h2>Alerts</h2>{alerts_html}</section>')
    html = page("nnforge monitor", body)
    html = html.replace("</style>", EXTRA_CSS + "</style>", 1)
    if refresh_s:
        html = html.replace("<head>\n", f'<head>\n<meta http-equiv="refresh" content="{int(refresh_s)}">\n', 1)
    return html


def _with_empty(rows: list, ws: float) -> list[tuple[float, int, int, float]]:
    """(start, count, negative, mean) for every window from the first to the last shown, empty ones included."""
    if not rows:
        return []
    have = {r[0]: r for r in rows}
    out, t = [], rows[0][0]
    while t <= rows[-1][0]:
        r = have.get(t)
        out.append((t, r[1], r[2], r[3] / r[1]) if r and r[1] else (t, 0, 0, 0.0))
        t += ws
    return out


def _duration(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)} {unit}"
    return f"{seconds:g} s"


def write_dashboard(state_path: str | Path, out: str | Path, refresh_s: int = 0) -> Path:
    """Write the page atomically (a temporary file renamed over the old one): a browser never reads half a page."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(state_path, refresh_s), encoding="utf-8")
    tmp.replace(out)
    return out

