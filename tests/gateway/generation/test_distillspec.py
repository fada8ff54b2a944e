"""DistillSpec on a tiny pair: the divergences are the verifier's, and training the draft on
on-policy data moves its acceptance towards the target."""

from __future__ import annotations

import torch

from fides.defaults.text import LMSpec
from verifier import losses
from verifier.distillspec import DIVERGENCES, DistillSpecConfig, distill
from verifier.lm import acceptance


def test_divergences_are_the_shared_losses() -> None:
    assert {
        "fkl": losses.fkl,
        "rkl": losses.rkl,
        "jsd": losses.jsd,
        "tvd": losses.tvd,
    } == DIVERGENCES


def test_distillspec_raises_acceptance() -> None:
    torch.manual_seed(0)
    vocab = 64
    target = LMSpec(layers=2, dim=48, heads=4, vocab_size=vocab, context=64, init_std=0.3).build(1)
    draft = LMSpec(layers=1, dim=32, heads=2, vocab_size=vocab, context=64, init_std=0.3).build(2)
    corpus = torch.randint(1, vocab, (4000,), generator=torch.Generator().manual_seed(3))
    cfg = DistillSpecConfig(
        divergence="tvd",
        steps=30,
        batch_size=8,
        prompt_len=8,
        gen_len=16,
        lr=3e-3,
        eval_prompts=16,
        eval_tokens=16,
    )
    result = distill(target, draft, corpus, corpus, cfg)
    assert result.after["t1"] > result.before["t1"] + 0.05, result
    assert result.after["greedy"] > result.before["greedy"], result
    assert result.history[-1] < result.history[0]
    # the reported figure is the measured acceptance of the trained draft
    g = torch.Generator().manual_seed(cfg.seed + 1)
    from verifier.lm import windows

    prompts = windows(corpus, cfg.eval_prompts, cfg.prompt_len, g)
    assert abs(acceptance(target, draft, prompts, 16, 1.0, seed=1) - result.after["t1"]) < 1e-3
