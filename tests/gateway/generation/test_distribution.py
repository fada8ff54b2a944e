"""With sampling, speculative outputs are distributed exactly as the target's own samples.

A tiny-vocabulary target (4 tokens) and a deliberately different draft; sequences of 3
tokens (64 outcomes) whose exact target probabilities are enumerated. Each check is a
chi-square goodness-of-fit test at significance 0.001: under a correct sampler it fails
with probability 0.1% per check (three checks: <= 0.3% for the file). The seeds are fixed,
so the outcome is deterministic run to run. A negative control shows the test has power: the
draft's own samples (what a sampler that forgot the rejection step would emit) are refused.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from fides.defaults.text import LMSpec
from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.runtime import CausalLM
from gateway.generation.sampling import warp
from gateway.generation.schedule import Lookahead

VOCAB, LENGTH, SAMPLES, SIGNIFICANCE = 4, 3, 2000, 1e-3
PROMPT = [1, 2]


def tiny(seed: int) -> CausalLM:
    spec = LMSpec(layers=1, dim=16, heads=2, vocab_size=VOCAB, context=16, init_std=0.5)
    return CausalLM(spec.build(seed), torch.device("cpu"), Path("."))


def exact(lm: CausalLM, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(sequence) under the warped target, by enumerating every sequence."""
    probs: dict[tuple[int, ...], float] = {}
    with torch.inference_mode():
        for seq in itertools.product(range(VOCAB), repeat=LENGTH):
            ids = torch.tensor([PROMPT + list(seq)])
            logits = lm.model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]  # [LENGTH, V]
            p = warp(logits, params)  # [LENGTH, V]
            probs[seq] = float(torch.prod(p[torch.arange(LENGTH), torch.tensor(seq)]))
    return probs


def counts(engine: SpeculativeEngine, params: SamplingParams) -> tuple[dict, float]:
    seen: dict[tuple[int, ...], int] = {}
    drafted = accepted = 0
    for seed in range(SAMPLES):
        seq = engine.start(PROMPT, SamplingParams(**{**params.__dict__, "seed": seed}))
        while seq.finished is None:
            engine.step(seq)
        key = tuple(seq.generated)
        seen[key] = seen.get(key, 0) + 1
        drafted += seq.stats["draft_tokens"]
        accepted += seq.stats["accepted"]
    return seen, (accepted / drafted if drafted else 1.0)


def p_value(seen: dict, probs: dict[tuple[int, ...], float]) -> float:
    # cells with a small expectation are pooled so the chi-square approximation holds
    keys = sorted(probs, key=probs.__getitem__, reverse=True)
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for k in keys:
        e = probs[k] * SAMPLES
        if e >= 5:
            obs.append(seen.get(k, 0))
            exp.append(e)
        else:
            pool_o += seen.get(k, 0)
            pool_e += e
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=LENGTH, temperature=1.0),
        SamplingParams(max_tokens=LENGTH, temperature=0.7, top_k=3, top_p=0.9),
    ],
    ids=["T=1", "T=0.7,top_k=3,top_p=0.9"],
)
def test_speculative_samples_follow_the_target(params: SamplingParams) -> None:
    target, draft = tiny(seed=1), tiny(seed=2)
    probs = exact(target, params)
    engine = SpeculativeEngine(target, draft, Lookahead(3), 16)
    seen, acceptance = counts(engine, params)
    assert 0.2 < acceptance < 0.9, f"acceptance {acceptance}: both paths must be exercised"
    p = p_value(seen, probs)
    assert p > SIGNIFICANCE, f"speculative samples differ from the target (p = {p:.2g})"


def test_the_check_has_power_draft_samples_are_refused() -> None:
    params = SamplingParams(max_tokens=LENGTH, temperature=1.0)
    target, draft = tiny(seed=1), tiny(seed=2)
    draft_only = SpeculativeEngine(draft, None, Lookahead(0), 16)
    seen, _ = counts(draft_only, params)
    assert p_value(seen, exact(target, params)) < SIGNIFICANCE


def test_samples_follow_the_target_in_a_busy_batch() -> None:
    """The same check with every sampled sequence decoded in a batch of 8: five more sampled
    sequences and two greedy fillers with other prompts and lengths, joining and leaving at
    different steps, so rows of every kind share each draft and target forward."""
    params = SamplingParams(max_tokens=LENGTH, temperature=1.0)
    target, draft = tiny(seed=1), tiny(seed=2)
    probs = exact(target, params)
    engine = SpeculativeEngine(target, draft, Lookahead(3), 16)
    seen: dict[tuple[int, ...], int] = {}
    seed = 0
    live: list = []
    fillers = 0
    while seed < SAMPLES or live:
        # top the batch up: six measured sequences and two greedy fillers of other shapes
        while seed < SAMPLES and sum(s.prompt_len == len(PROMPT) for s in live) < 6:
            live.append(engine.start(PROMPT, SamplingParams(**{**params.__dict__, "seed": seed})))
            seed += 1
        while seed < SAMPLES and len(live) < 8:
            fillers += 1
            prompt = [3, 1, 0, 2][: 1 + fillers % 4] + [1] * (fillers % 3)
            live.append(engine.start(prompt, SamplingParams(1 + fillers % 5, 0.0)))
        engine.step_batch(live)
        for s in [s for s in live if s.finished is not None]:
            live.remove(s)
            if s.prompt_len == len(PROMPT) and s.params.temperature > 0:
                key = tuple(s.generated)
                seen[key] = seen.get(key, 0) + 1
        assert len(engine.batch) <= 8
    assert sum(seen.values()) == SAMPLES
    p = p_value(seen, probs)
    assert p > SIGNIFICANCE, f"samples in a busy batch differ from the target (p = {p:.2g})"
