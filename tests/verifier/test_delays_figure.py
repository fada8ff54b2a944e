"""The delay chart of the answer-stream report (verifier.streams.delays_svg)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from verifier.streams import RATES, delays_svg

NS = "{http://www.w3.org/2000/svg}"


def _report() -> dict:
    def row(medians: list[float | None]) -> dict:
        return {
            f"{r:g}": {"median": m, "p90": m, "alarmed": 1.0 if m else 0.0, "horizon": h}
            for r, m, h in zip(RATES, medians, (200, 300, 1200, 6000), strict=True)
        }

    return {"delays": {"switch": row([5, 40, 300, None]), "gan<&>": row([10, None, None, None])}}


def test_the_chart_is_valid_svg_with_a_line_per_attack_on_a_log_scale() -> None:
    svg = delays_svg(_report(), "a & b")
    root = ET.fromstring(svg)  # well-formed, names escaped
    assert root.tag == NS + "svg"
    lines = root.findall(NS + "polyline")
    assert len(lines) == 2
    texts = [t.text for t in root.iter(NS + "text")]
    assert "a & b" in texts
    assert "gan<&>" in texts
    assert {"100%", "20%", "5%", "1%"} <= set(texts)
    # log scale: 5 -> 40 -> 300 answers climb by about log10(8) and log10(7.5) decades
    ys = [float(p.split(",")[1]) for p in lines[0].get("points", "").split()]
    assert ys[0] > ys[1] > ys[2] > ys[3]  # more answers = higher on the chart
    step1, step2 = ys[0] - ys[1], ys[1] - ys[2]
    assert abs(step1 / step2 - 0.903 / 0.875) < 0.01
    # a rate with no alarm within its horizon: an open circle at the horizon
    circles = root.findall(NS + "circle")
    open_ = [c for c in circles if c.get("fill") == "white"]
    assert len(open_) == 1 + 3 + 1  # switch at 1%, gan at 20/5/1%, the legend's sample
    assert delays_svg(_report(), "a & b") == svg  # deterministic
