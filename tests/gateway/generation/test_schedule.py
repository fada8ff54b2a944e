"""The speculation policy: the batch-wide cap on draft tokens, from measured costs."""

from __future__ import annotations

import pytest

from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.schedule import Lookahead, SpeculationPolicy, expected_tokens
from tests.gateway.generation.conftest import Pair
from tests.gateway.generation.test_engine import CONTEXT, prompts, reference_greedy, run


def policy_with(target_ms: dict[int, tuple[float, float]], draft_ms: float) -> SpeculationPolicy:
    """Target time = base + per_width * (w - 1) ms for each batch size; one draft time."""
    p = SpeculationPolicy(4, prior_alpha=0.8, prior_weight=1e6)  # alpha pinned at 0.8
    for b, (base, per_width) in target_ms.items():
        for w in range(1, 6):
            p.target_s[(b, w)] = (base + per_width * (w - 1)) / 1e3
        p.draft_s[b] = draft_ms / 1e3
    return p


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_speculation_pays_at_small_batches_and_stops_when_the_target_is_compute_bound() -> None:
    # batch 1: extra positions are nearly free (latency-bound); batch 16: each position of
    # each row costs as much as the first (compute-bound)
    p = policy_with({1: (10.0, 1.0), 4: (12.0, 3.0), 16: (20.0, 20.0)}, draft_ms=1.0)
    assert p.cap(1) == 4
    assert p.cap(16) == 0
    assert 0 <= p.cap(4) <= p.cap(1)
    c8 = p.cap(8)  # batch 8: interpolated between 4 and 16
    assert p.last == {
        "batch": 8,
        "alpha": 0.8,
        "cap": c8,
        "tokens_per_s": pytest.approx(p.last["tokens_per_s"]),
    }
    assert 0 <= c8 <= p.cap(4)


def test_a_poor_draft_is_switched_off_even_alone() -> None:
    p = policy_with({1: (10.0, 1.0)}, draft_ms=1.0)
    p.successes, p.trials = 1.0, 100.0  # acceptance 1%: drafting only costs
    assert p.cap(1) == 0


def test_acceptance_is_estimated_from_rounds_and_exploration_keeps_it_current() -> None:
    p = SpeculationPolicy(4, prior_alpha=0.6, prior_weight=20, explore_every=8)
    for _ in range(300):
        p.observe_acceptance(4, 2)  # two accepted, then a rejection: alpha = 2/3
    assert p.alpha == pytest.approx(2 / 3, abs=0.01)
    for _ in range(300):
        p.observe_acceptance(4, 4)  # all accepted: alpha climbs towards 1
    assert p.alpha > 0.9
    # a policy stuck at 0 drafts one full round in every explore_every
    q = policy_with({1: (10.0, 1.0)}, draft_ms=1.0)
    q.explore_every = 8
    q.successes, q.trials = 1.0, 100.0
    caps = [q.cap(1) for _ in range(16)]
    assert caps.count(4) == 2
    assert caps.count(0) == 14


def test_nothing_measured_leaves_the_schedules_alone() -> None:
    assert SpeculationPolicy(3).cap(2) == 3


def test_the_engine_calibrates_and_stays_exact_under_the_policy(pair: Pair) -> None:
    policy = SpeculationPolicy(4)
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT, policy=policy)
    assert engine.calibrate(max_batch=4) > 0
    assert sorted({b for b, _ in policy.target_s}) == [1, 2, 4]
    assert sorted({w for _, w in policy.target_s}) == [1, 2, 3, 5]  # 4 is interpolated
    t3, t4, t5 = (policy.t_target(2, w) for w in (3, 4, 5))
    assert t3 is not None
    assert t5 is not None
    assert t4 == pytest.approx((t3 + t5) / 2)
    assert sorted(policy.draft_s) == [1, 2, 4]
    assert engine.target_kv.rows == 0  # calibration left no rows behind
    ps = prompts(4, pair.target.vocab_size, seed=11)
    seqs = [engine.start(p, SamplingParams(16, 0.0)) for p in ps]
    while any(s.finished is None for s in seqs):
        engine.step_batch(seqs)
        assert engine.last_cap is None or 0 <= engine.last_cap <= 4
    for seq, p in zip(seqs, ps, strict=True):
        assert seq.generated == reference_greedy(pair.target, p, 16)


def test_a_seeded_sample_does_not_depend_on_the_load_dependent_cap(pair: Pair) -> None:
    """The policy's cap changes with the load; a sampled sequence with a seed keeps its own
    draft schedule, so the same seed gives the same text under any cap."""
    prompt = prompts(1, pair.target.vocab_size, seed=12)[0]
    params = SamplingParams(24, temperature=1.0, seed=5)
    free = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    policy = policy_with({1: (1.0, 0.0)}, draft_ms=50.0)  # a draft token never pays: cap 0
    assert policy.cap(1) == 0
    capped = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT, policy=policy)
    assert run(capped, prompt, params) == run(free, prompt, params)


def test_a_width_measured_at_one_batch_size_does_not_stand_in_for_the_others() -> None:
    """The load-time grid skips width 4 (1, 2, 3, 5 for a maximum of 4); a live round then
    measures (batch 2, width 4). The estimate at (8, 4) still comes from batch 8's own widths,
    not from batch 2's time scaled by the rows."""
    p = policy_with({1: (1.0, 0.1), 2: (1.5, 0.1), 4: (2.5, 0.2), 8: (4.0, 0.4)}, draft_ms=0.3)
    for b in (1, 2, 4, 8):
        del p.target_s[(b, 4)]
    before = p.t_target(8, 4)
    assert before == pytest.approx((4.0 + 0.4 * 3) / 1e3)  # halfway between widths 3 and 5
    p.observe_target(2, 4, 1.8e-3)
    assert p.t_target(8, 4) == pytest.approx(before)
    assert p.t_target(2, 4) == pytest.approx(1.8e-3)
    assert p.t_target(6, 4) == pytest.approx((p.t_target(4, 4) + before) / 2)
