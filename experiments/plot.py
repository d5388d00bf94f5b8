"""SVG pictures without a plotting library: a line chart (reward against step, accuracy against length or rank),
a bar chart with error whiskers (fidelity.py's KL per row), and the teaching diagram of the fixed-size cache (prompt
pinned, the ring of thought slots, each eviction of m tokens folded into S). Elements are plain strings; `document`
wraps them; every number is rounded to 0.1 px.

    python experiments/plot.py [--out docs/pte-cache.svg] [--window 8] [--evict 0.25] [--tokens 22]   the diagram
"""
import argparse
import math
from html import escape
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the core modules
from cache import evict_count, eviction_steps  # noqa: E402

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
FONT = 'font-family="sans-serif" font-size="12"'


def _n(x):
    return f"{x:.1f}".rstrip("0").rstrip(".")


def rect(x, y, w, h, fill, stroke="#444", **attrs):
    extra = "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items())
    return f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" fill="{fill}" stroke="{stroke}"{extra}/>'


def text(x, y, s, anchor="start", size=12, color="#000", weight="normal"):
    return (f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}" font-size="{size}" fill="{color}" '
            f'font-weight="{weight}">{escape(str(s))}</text>')


def line(x1, y1, x2, y2, color="#000", width=1, dash=None, arrow=False):
    extra = (f' stroke-dasharray="{dash}"' if dash else "") + (' marker-end="url(#arrow)"' if arrow else "")
    return (f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{color}" '
            f'stroke-width="{width}"{extra}/>')


def polyline(points, color, width=2, label=""):
    pts = " ".join(f"{_n(x)},{_n(y)}" for x, y in points)
    return (f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}" '
            f'data-label="{escape(label)}"/>')


def document(width, height, elements):
    """A standalone SVG: white background, an arrow-head marker, the elements in order."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}>'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#000"/></marker></defs>')
    return "\n".join([head, rect(0, 0, width, height, "#fff", "none"), *elements, "</svg>\n"])


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series, title, xlabel, ylabel, ylim=None, xlog=False, width=590, height=340):
    """series: [(label, xs, ys)] -> SVG text. Lines with point markers, axes with round ticks, a legend on the right.
    xlog: a log2 x axis (ranks 4, 8, 16, 32 equally spaced), ticks at the data's x values."""
    left, right, top, bottom = 56, 180, 30, 44
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    if not xs_all:
        raise ValueError(f"line_chart {title!r}: no data points")
    tx = (lambda x: math.log2(x)) if xlog else (lambda x: x)
    x0, x1 = min(map(tx, xs_all)), max(map(tx, xs_all))
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x0 == x1 else (x0, x1)
    y0, y1 = ylim or (min(ys_all), max(ys_all))
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == y1 else (y0, y1)
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + (tx(x) - x0) / (x1 - x0) * pw  # noqa: E731
    py = lambda y: top + (1 - (y - y0) / (y1 - y0)) * ph  # noqa: E731
    out = [text(width / 2 - right / 2, 18, title, "middle", 13, weight="bold"),
           rect(left, top, pw, ph, "none", "#888")]
    xticks = sorted(set(xs_all)) if xlog else nice_ticks(x0, x1)
    for x in xticks:
        out += [line(px(x), top + ph, px(x), top + ph + 4, "#888"), text(px(x), top + ph + 16, _n(x), "middle", 11)]
    for y in nice_ticks(y0, y1):
        out += [line(left, py(y), left + pw, py(y), "#ddd"), text(left - 6, py(y) + 4, _n(y), "end", 11)]
    out += [text(left + pw / 2, height - 8, xlabel, "middle"),
            f'<text transform="translate(14,{_n(top + ph / 2)}) rotate(-90)" text-anchor="middle">'
            f'{escape(ylabel)}</text>']
    for i, (label, xs, ys) in enumerate(series):
        color, pts = COLORS[i % len(COLORS)], [(px(x), py(y)) for x, y in zip(xs, ys)]
        out.append(polyline(pts, color, 2, label))
        if len(pts) <= 30:
            out += [f'<circle cx="{_n(x)}" cy="{_n(y)}" r="3" fill="{color}"/>' for x, y in pts]
        ly = top + 10 + 18 * i
        out += [line(left + pw + 10, ly, left + pw + 30, ly, color, 3), text(left + pw + 36, ly + 4, label, size=11)]
    return document(width, height, out)


def bar_chart(rows, title):
    """rows: [(label, value, standard error, note)] -> SVG text: a horizontal bar a row, from zero, the s.e. as a
    whisker from value - s.e. to value + s.e., then the value and the note; the largest value + s.e. spans the plot."""
    left, span, row = 110, 420, 26
    end = max((v + e for _, v, e, _ in rows), default=0)
    if end <= 0:
        raise ValueError(f"bar_chart {title!r}: no rows, or no positive value + s.e. to scale the bars to")
    px = lambda v: left + span * v / end  # noqa: E731
    out = [text(10, 20, title, size=13)]
    for i, (label, v, e, note) in enumerate(rows):
        y = 40 + i * row
        out += [text(left - 6, y + 14, label, "end"),
                rect(left, y, px(v) - left, row - 8, "#4a7ab5", "none", data_label=label),
                line(px(v - e), y + 9, px(v + e), y + 9),
                text(px(v + e) + 6, y + 14, f"{v:.4f} {note}")]
    return document(left + span + 170, 50 + len(rows) * row, out)


def smooth(ys, k):
    """Trailing mean over k points (the reward of one step is a noisy estimate)."""
    return [sum(ys[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(ys))]


def save(svg, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg)
    return path


def cache_diagram(prompt_len=19, window=8, evict=0.25, n_tokens=22, memo=3):
    """The fixed-size cache over decoding steps: one row per thought token t, the pinned prompt block, the W ring
    slots (each cell names the thought it holds; the one written at t is dark, the memo thought orange), and at
    each eviction of m tokens a red mark on the freed slots and an arrow into S, the fold S <- N(S + S'(K_e, V_e))
    (S_i: S after i folds)."""
    m = evict_count(window, evict)
    evictions = eviction_steps(n_tokens, window, m, "window")
    cell, row, left, top = 30, 20, 60, 84
    ring_x = left + 90
    s_x = ring_x + window * cell + 60
    height = top + n_tokens * row + 44
    out = [text(12, 20, f"Decoding under a fixed cache: the prompt ({prompt_len} slots) is pinned, "
                f"W = {window} thought slots form a ring,", weight="bold"),
           text(12, 36, f"and when it is full the m = {m} oldest thoughts are evicted and folded into the "
                "encoder's state S.", weight="bold"),
           text(left + 40, top - 10, "prompt", "middle"),
           text(ring_x + window * cell / 2, top - 24, "ring of thought slots", "middle"),
           text(s_x + 15, top - 10, "S", "middle")]
    out += [text(ring_x + j * cell + cell / 2, top - 8, prompt_len + j, "middle", 9) for j in range(window)]
    oldest = 0  # first thought still in the window
    for t in range(n_tokens):
        y = top + t * row
        if t in evictions:  # before writing t: drop thoughts oldest .. oldest + m - 1, fold them into S
            for j in range(oldest, oldest + m):
                out.append(rect(ring_x + (j % window) * cell + 2, y - 3, cell - 4, 4, "#d62728", "none",
                                data_evicted=j))
            out.append(line(ring_x + window * cell + 4, y, s_x - 4, y, "#d62728", 1.5, arrow=True))
            note = f"S <- N(S + S'(K, V of thoughts {oldest}..{oldest + m - 1}))"
            if oldest <= memo < oldest + m:
                note += f": the memo (thought {memo}) now lives only in S"
            out.append(text(s_x + 36, y + 4, note, "start", 10, "#d62728"))
            oldest += m
        folds = sum(e <= t for e in evictions)
        out += [text(left - 8, y + 14, f"t = {t}", "end", 10), rect(left, y, 80, row - 2, "#bbb", "#888"),
                text(left + 40, y + 13, "pinned", "middle", 9, "#333"),
                rect(s_x, y, 30, row - 2, "#f2d9a6" if folds else "#fbeed0", "#888"),
                text(s_x + 15, y + 13, f"S{folds}", "middle", 9)]
        for j in range(oldest, t + 1):
            fill = "#1f77b4" if j == t else "#ff9f40" if j == memo else "#aec7e8"
            slot_x = ring_x + (j % window) * cell
            out += [rect(slot_x, y, cell - 2, row - 2, fill, "#888", data_slot=j % window, data_token=j),
                    text(slot_x + cell / 2 - 1, y + 13, j, "middle", 10, "#fff" if j == t else "#000")]
    out.append(text(12, height - 22, "Cells: the thought each slot holds (dark: written at this step; "
                    "orange: the memo). Red: the m oldest thoughts, evicted before this step's write;", size=10))
    out.append(text(12, height - 8, "their keys (un-rotated to pre-RoPE) and values fold into S, which the adapters "
                    "read at every later step: y += (alpha / r) B S A x.", size=10))
    return document(s_x + 440, height, out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the teaching diagram of the fixed-size cache as SVG.")
    p.add_argument("--out", type=Path, default=Path("docs/pte-cache.svg"), help="output file")
    p.add_argument("--prompt", type=int, default=19, help="prompt slots (drawn as one pinned block)")
    p.add_argument("--window", type=int, default=8, help="thought slots W")
    p.add_argument("--evict", type=float, default=0.25, help="share of W evicted when the ring is full")
    p.add_argument("--tokens", type=int, default=22, help="thought tokens decoded")
    p.add_argument("--memo", type=int, default=3, help="thought drawn as the memo (-1: none)")
    a = p.parse_args(argv)
    print(f"wrote {save(cache_diagram(a.prompt, a.window, a.evict, a.tokens, a.memo), a.out)}")


if __name__ == "__main__":
    main()
