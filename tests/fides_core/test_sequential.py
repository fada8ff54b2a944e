"""The sequential e-detector (issue 21): its false-alarm guarantee measured on simulated clean
streams (with a control in which the null is violated, to show the check can fail), detection
of attacked streams, both tails, late changes, bounded state."""

from __future__ import annotations

import numpy as np
import pytest

from fides_core.sequential import SequentialDetector, calibrate_scores


def detector(n: int = 1000, alpha: float = 0.01, seed: int = 0, **kw: object) -> SequentialDetector:
    rng = np.random.default_rng(seed)
    cal = {"score": calibrate_scores(rng.normal(size=n), delta=1e-3)}
    tails = kw.pop("tails", {"score": ("upper",)})
    return SequentialDetector(cal, tails, alpha=alpha, **kw)  # type: ignore[arg-type]


def run_lengths(det: SequentialDetector, streams: np.ndarray) -> np.ndarray:
    """Answers until the alarm (the stream's length + 1 where it never fired)."""
    out = []
    for stream in streams:
        state = det.new_state()
        det.update(state, {"score": stream})
        out.append(state.alarm_at if state.alarm_at is not None else len(stream) + 1)
    return np.asarray(out)


def test_p_values_are_conservative_and_monotone() -> None:
    cal = calibrate_scores(np.arange(100.0), delta=1e-3)
    p = cal.p(np.array([-5.0, 0.0, 50.0, 99.0, 99.5, 1e9]))
    assert np.all(np.diff(p) <= 0)  # larger scores, smaller p
    assert p[0] == 1.0
    # the plain conformal p-value of a score above every calibration score is 1/101; the
    # calibration-conditional one is larger (the price of holding for this calibration)
    assert 1 / 101 < p[-1] < 0.2
    assert cal.p(np.array([99.0]))[0] == cal.p(np.array([98.5]))[0]  # a tie counts against it
    lower = cal.p(np.array([-5.0, 99.0]), "lower")
    assert lower[0] < lower[1]
    with pytest.raises(ValueError, match="at least 10 finite"):
        calibrate_scores(np.array([1.0, np.nan] * 10))
    # a score that is not a number is no evidence, in either tail (not the strongest)
    assert cal.p(np.array([np.nan]))[0] == 1.0
    assert cal.p(np.array([np.nan]), "lower")[0] == 1.0


def test_clean_streams_rarely_alarm_and_a_violated_null_does() -> None:
    """Average run length to a false alarm >= 1 / alpha on clean streams (measured, censored
    at 1,500 answers, so a lower bound); the control: the same detector on streams whose
    scores run a little high (the null violated) alarms early, so the check can fail."""
    det = detector(alpha=0.01)
    rng = np.random.default_rng(1)
    clean = run_lengths(det, rng.normal(size=(150, 1500)))
    assert clean.mean() >= 1 / det.alpha, clean.mean()  # measured: about 900
    shifted = run_lengths(det, rng.normal(loc=0.7, size=(150, 1500)))
    assert np.median(shifted) < 200
    assert (shifted <= 1500).mean() > 0.9


@pytest.mark.parametrize(("rate", "within"), [(1.0, 10), (0.2, 80), (0.05, 600)])
def test_attacked_streams_raise_the_alarm(rate: float, within: int) -> None:
    det = detector(alpha=1e-5)
    rng = np.random.default_rng(2)
    streams = rng.normal(size=(40, 3000))
    tampered = rng.random(streams.shape) < rate
    streams[tampered] = rng.normal(loc=5.0, size=int(tampered.sum()))  # a confident detector
    lengths = run_lengths(det, streams)
    assert np.median(lengths) <= within, np.median(lengths)


def test_a_stream_too_close_to_the_verifier_alarms_on_the_lower_tail() -> None:
    rng = np.random.default_rng(3)
    low = rng.normal(loc=-4.0, size=(20, 200))  # KL near 0: answers copy the verifier
    upper_only = detector(alpha=1e-5, tails={"score": ("upper",)})
    both = detector(alpha=1e-5, tails={"score": ("upper", "lower")})
    assert (run_lengths(upper_only, low) > 200).all()
    assert np.median(run_lengths(both, low)) <= 15


def test_tampering_that_starts_late_is_caught_soon_after() -> None:
    det = detector(alpha=1e-4)
    rng = np.random.default_rng(4)
    state = det.new_state()
    det.update(state, {"score": rng.normal(size=5000)})
    assert not state.alarm
    det.update(state, {"score": rng.normal(loc=5.0, size=50)})
    assert state.alarm
    assert state.alarm_at is not None
    assert state.alarm_at - 5000 <= 12  # Shiryaev-Roberts forgets the clean past


def test_state_is_small_fixed_and_resets() -> None:
    det = detector(tails={"score": ("upper", "lower")})
    state = det.new_state()
    # two tails x four tamper rates x three calibrators, whatever the stream's length
    assert state.r.shape == (2 * 4 * 3,)
    det.update(state, {"score": np.full(30, 10.0)})
    assert state.alarm
    assert state.answers == 30
    det.reset(state)
    assert (state.alarm, state.alarm_at, det.statistic(state)) == (False, None, 0.0)
    with pytest.raises(ValueError, match="one value per answer"):
        SequentialDetector(
            {"a": calibrate_scores(np.arange(20.0)), "b": calibrate_scores(np.arange(20.0))},
            {"a": ("upper",), "b": ("upper",)},
        ).e_values({"a": np.zeros(3), "b": np.zeros(4)})


def test_the_vectorised_simulation_matches_the_streaming_update() -> None:
    det = detector(alpha=1e-3, tails={"score": ("upper", "lower")})
    rng = np.random.default_rng(5)
    streams = rng.normal(size=(30, 400))
    streams[:10, 100:] += 3.0  # ten streams attacked from answer 101 on
    np.testing.assert_array_equal(det.run_lengths({"score": streams}), run_lengths(det, streams))
