"""plot.py: the SVG it writes parses, puts the data where the axes say (bars and whiskers where the values say), and
the cache diagram shows what the cache holds."""
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch

import plot
from cache import RingCache, evict_count, eviction_steps

NS = "{http://www.w3.org/2000/svg}"


def points(svg, label):
    line = next(e for e in ET.fromstring(svg).iter(NS + "polyline") if e.get("data-label") == label)
    return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def frame(svg):
    """(left, top, right, bottom) of the plot area: the unfilled grey rectangle."""
    r = next(e for e in ET.fromstring(svg).iter(NS + "rect") if e.get("fill") == "none" and e.get("stroke") == "#888")
    x, y, w, h = (float(r.get(k)) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def test_line_chart_maps_data_onto_the_axes():
    svg = plot.line_chart([("a", [0, 5, 10], [0.0, 0.5, 1.0]), ("b", [0, 10], [0.25, 0.25])], "t", "step", "reward",
                          ylim=(0, 1))
    left, top, right, bottom = frame(svg)
    a = points(svg, "a")
    assert a[0] == (left, bottom) and a[2] == (right, top)  # (0, 0) and (10, 1): the corners
    assert a[1] == ((left + right) / 2, (top + bottom) / 2)  # (5, 0.5): the middle
    assert points(svg, "b")[0][1] == bottom - 0.25 * (bottom - top)
    labels = [t.text for t in ET.fromstring(svg).iter(NS + "text")]
    assert {"a", "b", "step", "reward", "0.2", "0.8"} <= set(labels)  # legend, axis titles, y ticks


def test_log_axis_spaces_ranks_evenly():
    svg = plot.line_chart([("r", [4, 8, 16, 32], [1, 2, 3, 4])], "t", "rank", "memos", xlog=True)
    xs = [x for x, _ in points(svg, "r")]
    assert abs((xs[1] - xs[0]) - (xs[3] - xs[2])) < 0.11 and xs[0] < xs[1] < xs[2] < xs[3]


def test_bar_chart_scales_bars_and_whiskers():
    rows = [("window", 0.2, 0.05, "(+0% closed)"), ("PTE", 0.1, 0.02, "(+50% closed)")]
    root = ET.fromstring(plot.bar_chart(rows, "KL per row"))
    bars = [e for e in root.iter(NS + "rect") if e.get("data-label")]
    whiskers = list(root.iter(NS + "line"))
    assert [b.get("data-label") for b in bars] == ["window", "PTE"] and len(whiskers) == 2
    x0, scale = float(bars[0].get("x")), float(bars[0].get("width")) / 0.2  # px per unit of value
    for bar, whisker, (_, value, se, _) in zip(bars, whiskers, rows):
        assert float(bar.get("x")) == x0 and abs(float(bar.get("width")) - value * scale) < 0.06  # from 0, to value
        assert abs(float(whisker.get("x1")) - (x0 + (value - se) * scale)) < 0.06  # value - s.e.
        assert abs(float(whisker.get("x2")) - (x0 + (value + se) * scale)) < 0.06  # value + s.e.
        y, h = float(bar.get("y")), float(bar.get("height"))
        assert y < float(whisker.get("y1")) == float(whisker.get("y2")) < y + h  # across its own bar
    labels = {t.text for t in root.iter(NS + "text")}
    assert {"KL per row", "window", "PTE", "0.2000 (+0% closed)", "0.1000 (+50% closed)"} <= labels
    with pytest.raises(ValueError, match="no rows"):
        plot.bar_chart([], "empty")


def test_nice_ticks():
    assert plot.nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plot.nice_ticks(1, 300) == [50, 100, 150, 200, 250, 300]


def ring_contents(prompt, window, m, n_tokens):
    """{t: {slot: thought}} of the real RingCache, driven as rollout.generate drives it."""
    cfg = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=2)
    cache, evicted, seen = RingCache.allocate(cfg, [prompt], [window], [m], torch.float32, "cpu"), 0, {}
    for t in range(n_tokens):
        if t - evicted == window:  # the ring is full: it drops its oldest m
            cache.evict(t, 1, m)
            evicted += m
        cache.write_thought(t, torch.tensor([prompt + t]))
        seen[t] = {s - prompt: int(p) - prompt for s, p in enumerate(cache.pos[0].tolist()) if s >= prompt and p >= 0}
    return seen


def test_cache_diagram_draws_the_ring_cache():
    for window, evict, n in ((8, 0.25, 22), (6, 0.5, 17)):
        m = evict_count(window, evict)
        root = ET.fromstring(plot.cache_diagram(19, window, evict, n, memo=3))
        cells = [e for e in root.iter(NS + "rect") if e.get("data-token")]
        rows = sorted({float(c.get("y")) for c in cells})
        assert len(rows) == n
        drawn = {i: {int(c.get("data-slot")): int(c.get("data-token")) for c in cells if float(c.get("y")) == y}
                 for i, y in enumerate(rows)}
        assert drawn == ring_contents(19, window, m, n)
        marks = [int(e.get("data-evicted")) for e in root.iter(NS + "rect") if e.get("data-evicted")]
        evictions = len(eviction_steps(n, window, m, "window"))
        assert marks == list(range(m * evictions))  # each eviction of m, once, in order
        assert sum(1 for e in root.iter(NS + "line") if e.get("marker-end")) == evictions
