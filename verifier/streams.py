"""Streams of answers (issue 21): how many answers the sequential e-detector
(:mod:`fides_core.sequential`) needs to raise the alarm at each tamper rate, and how long
clean streams run before a false alarm, simulated from the evaluation's per-answer scores.

Each answer carries two scores: the detector's and KL(service || verifier). Clean streams
resample the evaluation split's clean answers (both scores of one answer together); an
attacked stream replaces each answer, with probability ``rate``, by a resampled answer of the
attack (a row whose top-1 the attack changed). The monitor is calibrated on the calibration
split, which no stream draws from. A provider that tampers with every answer of one client in
a hundred shows up as a 100% rate on that client's key and a 1% rate on the model: the two
rows give both delays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from fides_core.sequential import SequentialDetector, calibrate_scores

__all__ = ["ScoredAnswers", "delays_markdown", "delays_svg", "stream_report"]

RATES = (1.0, 0.2, 0.05, 0.01)


@dataclass(frozen=True)
class ScoredAnswers:
    """Per-answer scores of one kind of answer (clean, or one attack)."""

    detector: np.ndarray  # [n]
    kl: np.ndarray  # [n] KL(service || verifier)

    def __len__(self) -> int:
        return len(self.detector)


def _detector(cal: ScoredAnswers, alpha: float, delta: float) -> SequentialDetector:
    return SequentialDetector(
        {"detector": calibrate_scores(cal.detector, delta), "kl": calibrate_scores(cal.kl, delta)},
        {"detector": ("upper",), "kl": ("upper", "lower")},
        alpha=alpha,
    )


def _streams(
    clean: ScoredAnswers,
    attacked: ScoredAnswers | None,
    rate: float,
    shape: tuple[int, int],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    idx = rng.integers(0, len(clean), shape)
    det, kl = clean.detector[idx], clean.kl[idx]
    if attacked is not None and len(attacked):
        hit = rng.random(shape) < rate
        aidx = rng.integers(0, len(attacked), int(hit.sum()))
        det[hit], kl[hit] = attacked.detector[aidx], attacked.kl[aidx]
    return {"detector": det, "kl": kl}


def _delays(lengths: np.ndarray, horizon: int) -> dict[str, Any]:
    alarmed = lengths <= horizon
    return {
        "median": float(np.median(lengths)) if alarmed.mean() > 0.5 else None,
        "p90": float(np.quantile(lengths, 0.9)) if alarmed.mean() > 0.9 else None,
        "alarmed": round(float(alarmed.mean()), 4),
        "horizon": horizon,
    }


def stream_report(
    calibration: ScoredAnswers,
    clean: ScoredAnswers,
    attacks: dict[str, ScoredAnswers],
    *,
    alpha: float = 1e-5,
    delta: float = 1e-5,
    streams: int = 40,
    clean_streams: int = 200,
    clean_length: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Detection delays per attack and tamper rate, and clean run lengths."""
    det = _detector(calibration, alpha, delta)
    rng = np.random.default_rng(seed)
    # clean streams: false alarms over clean_streams x clean_length answers
    lengths = det.run_lengths(_streams(clean, None, 0.0, (clean_streams, clean_length), rng))
    fired = lengths <= clean_length
    answers = int(np.minimum(lengths, clean_length).sum())
    alarms = int(fired.sum())
    upper = float(stats.chi2.ppf(0.95, 2 * (alarms + 1)) / 2)  # Poisson, one-sided 95%
    delays: dict[str, dict[str, Any]] = {}
    for name, rows in attacks.items():
        delays[name] = {}
        for rate in RATES:
            horizon = max(200, math.ceil(60 / rate))  # room for about 60 tampered answers
            got = det.run_lengths(_streams(clean, rows, rate, (streams, horizon), rng))
            delays[name][f"{rate:g}"] = _delays(got, horizon)
    return {
        "alpha": alpha,
        "delta": delta,
        "calibration_answers": len(calibration),
        "components": len(det.components),
        "clean": {
            "answers": answers,
            "false_alarms": alarms,
            "false_alarms_per_answer_upper_95": upper / answers,
            "run_length_lower_95": round(answers / upper),
        },
        "delays": delays,
        "one_client_of_100": {
            name: {"key": delays[name]["1"]["median"], "model": delays[name]["0.01"]["median"]}
            for name in attacks
        },
    }


def delays_markdown(report: dict[str, Any]) -> list[str]:
    """The delay table (median answers to the alarm per attack and tamper rate)."""
    rates = [f"{r:g}" for r in RATES]
    lines = [
        "| attack | " + " | ".join(f"{float(r):.0%} tampered" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for name, row in report["delays"].items():
        cells = []
        for r in rates:
            d = row[r]
            cells.append(f"{d['median']:.0f}" if d["median"] is not None else f"> {d['horizon']:,}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# Colours of the delay chart's lines (Okabe and Ito's palette, readable with colour blindness)
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999")


def delays_svg(report: dict[str, Any], title: str) -> str:
    """The delay curves as a standalone SVG line chart: tamper rate (x) against the median
    number of answers to the alarm (y, log scale), one line per attack. Where no stream of a
    rate alarmed within its horizon, the point is an open circle at the horizon (the true delay
    is larger); the table beside it says the same in numbers. Deterministic text, so a test can
    compare it with a stored copy."""
    rates = [f"{r:g}" for r in RATES]
    width, height, left, right, top, bottom = 720, 360, 64, 220, 40, 48
    horizons = [d["horizon"] for row in report["delays"].values() for d in row.values()]
    top_decade = max(1, math.ceil(math.log10(max([10, *horizons]))))
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + plot_w * i / max(1, len(rates) - 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - math.log10(max(v, 1.0)) / top_decade)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="14">'
        f"{_esc(title)}</text>",
    ]
    for k in range(top_decade + 1):  # horizontal grid, one line per decade
        yy = y(10.0**k)
        out.append(
            f'<line x1="{left}" y1="{yy:.1f}" x2="{left + plot_w}" y2="{yy:.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{10**k:,}</text>')
    for i, r in enumerate(rates):
        out.append(
            f'<text x="{x(i):.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
            f"{float(r):.0%}</text>"
        )
    out += [
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">'
        "share of answers tampered with</text>",
        f'<text x="16" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + plot_h / 2:.0f})">median answers to the alarm</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#888"/>',
    ]
    for n, (name, row) in enumerate(report["delays"].items()):
        colour = _COLOURS[n % len(_COLOURS)]
        points = []
        for i, r in enumerate(rates):
            d = row[r]
            censored = d["median"] is None
            points.append((x(i), y(d["horizon"] if censored else d["median"]), censored))
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, censored in points:
            fill = "white" if censored else colour
            out.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{fill}" stroke="{colour}" '
                'stroke-width="2"/>'
            )
        ly = top + 14 + 18 * n
        out.append(
            f'<line x1="{width - right + 12}" y1="{ly - 4}" x2="{width - right + 32}" '
            f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{width - right + 38}" y="{ly}">{_esc(name)}</text>')
    ly = top + 14 + 18 * len(report["delays"]) + 8
    out.append(
        f'<circle cx="{width - right + 22}" cy="{ly - 4}" r="4" fill="white" stroke="#555" '
        'stroke-width="2"/>'
    )
    out.append(f'<text x="{width - right + 38}" y="{ly}">no alarm within</text>')
    out.append(f'<text x="{width - right + 38}" y="{ly + 14}">the horizon</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
