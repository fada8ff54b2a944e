"""The speculative engine against independent references (no KV cache, no draft)."""

from __future__ import annotations

import pytest
import torch

from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.runtime import CausalLM
from gateway.generation.sampling import warp
from gateway.generation.schedule import Lookahead
from tests.gateway.generation.conftest import Pair

CONTEXT = 128


def reference_greedy(lm: CausalLM, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding recomputing the whole prefix every step (no cache at all)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def run(engine: SpeculativeEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    for rnd in engine.generate(prompt, params):
        out.extend(rnd.tokens)
    return out


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_speculative_equals_target_greedy_on_60_prompts(pair: Pair) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    engines = {
        "near k=4": SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT),
        "near adaptive": SpeculativeEngine(
            pair.target, pair.near, Lookahead(2, "adaptive", 8), CONTEXT
        ),
        "near confidence": SpeculativeEngine(
            pair.target, pair.near, Lookahead(8, "confidence", 8, 0.5), CONTEXT
        ),
        "far k=3": SpeculativeEngine(pair.target, pair.far, Lookahead(3), CONTEXT),
    }
    drafted = dict.fromkeys(engines, 0)
    accepted = dict.fromkeys(engines, 0)
    for i, prompt in enumerate(prompts(60, pair.target.vocab_size)):
        want = reference_greedy(pair.target, prompt, greedy.max_tokens)
        for name, engine in engines.items():
            seq = engine.start(prompt, greedy)
            while seq.finished is None:
                engine.step(seq)
            assert seq.generated == want, f"prompt {i} ({name}) differs from plain greedy"
            drafted[name] += seq.stats["draft_tokens"]
            accepted[name] += seq.stats["accepted"]
    # both paths were exercised: accepted drafts and corrections after a rejection
    for name in engines:
        assert 0 < accepted[name] < drafted[name], (name, accepted[name], drafted[name])
    assert accepted["near k=4"] / drafted["near k=4"] > 0.5
    assert accepted["far k=3"] / drafted["far k=3"] < 0.3


def test_zero_speculative_tokens_is_plain_decoding(pair: Pair) -> None:
    plain = SpeculativeEngine(pair.target, pair.near, Lookahead(0), CONTEXT)
    no_draft = SpeculativeEngine(pair.target, None, Lookahead(4), CONTEXT)
    params = SamplingParams(max_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=11)
    for prompt in prompts(8, pair.target.vocab_size, seed=1):
        # the reference sampler: warp + multinomial on the full prefix, same seeded generator
        g = torch.Generator().manual_seed(11)
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                logits = pair.target.model(input_ids=torch.tensor([ids])).logits[0, -1:]
                ids.append(int(torch.multinomial(warp(logits, params)[0], 1, generator=g)))
        want = ids[len(prompt) :]
        assert run(plain, prompt, params) == want
        assert run(no_draft, prompt, params) == want
        greedy = SamplingParams(max_tokens=20, temperature=0.0)
        assert run(plain, prompt, greedy) == reference_greedy(pair.target, prompt, 20)


def test_kv_cache_crop_leaves_no_stale_entries(pair: Pair) -> None:
    """After every round both caches hold exactly the accepted prefix, and the target's
    keys equal those of a fresh prefill of it: stale draft positions would show up as extra
    length or as different keys (their positions are reused by the accepted tokens)."""
    engine = SpeculativeEngine(pair.target, pair.far, Lookahead(4), CONTEXT)
    seq = engine.start(prompts(1, pair.target.vocab_size, seed=5)[0], SamplingParams(40, 0.0))
    rejections = 0
    while seq.finished is None:
        rnd = engine.step(seq)
        rejections += rnd.accepted < rnd.drafted
        assert seq.draft_cache is not None
        assert seq.target_cache.length == len(seq.ids) - 1
        assert seq.target_cache.cache.get_seq_length() == len(seq.ids) - 1
        assert seq.draft_cache.length <= len(seq.ids) - 1
        assert seq.draft_cache.cache.get_seq_length() == seq.draft_cache.length
    assert rejections > 5
    fresh = pair.target.new_cache()
    pair.target.forward(seq.ids[:-1], fresh, keep=1)
    for kept, ref in zip(seq.target_cache.cache.layers, fresh.cache.layers, strict=True):
        # keys: [batch, heads, positions, head_dim]
        assert kept.keys.shape == ref.keys.shape
        torch.testing.assert_close(kept.keys, ref.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kept.values, ref.values, atol=1e-4, rtol=1e-4)


def test_max_tokens_and_eos_end_the_sequence(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    prompt = prompts(1, pair.target.vocab_size, seed=2)[0]
    for n in (1, 2, 5, 7):
        out = run(engine, prompt, SamplingParams(max_tokens=n, temperature=0.0))
        assert len(out) == n
    full = run(engine, prompt, SamplingParams(max_tokens=30, temperature=0.0))
    eos = full[9]  # pretend the 10th token is EOS: generation stops right after it
    out = run(engine, prompt, SamplingParams(30, 0.0, eos_token_ids=frozenset({eos})))
    assert out == full[: full.index(eos) + 1]


def test_prompt_past_the_context_is_refused(pair: Pair) -> None:
    engine = SpeculativeEngine(pair.target, pair.near, Lookahead(4), CONTEXT)
    with pytest.raises(ValueError, match="context"):
        engine.start([1] * 100, SamplingParams(max_tokens=29, temperature=0.0))
    with pytest.raises(ValueError, match="empty"):
        engine.start([], SamplingParams(max_tokens=1))


def test_warp_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = warp(logits, SamplingParams(1, temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = warp(logits, SamplingParams(1, temperature=1.0, top_p=0.9))  # 0.5+0.3 < 0.9: keep 3
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    p = warp(logits, SamplingParams(1, temperature=1.0, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
