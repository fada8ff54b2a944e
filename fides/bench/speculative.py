"""Speculative decoding benchmark: tokens/s of the engine against target-only decoding, Hugging
Face ``generate(assistant_model=...)`` and the speedup predicted from alpha and measured costs.

Pairs: the embedded default (``<repository>/code``, Python code) and, when
``war_and_peace.txt`` is in the data directory, a pair trained on it (same recipe, cached in
``runs/speculative/``) and evaluated on the held-out ``anna_karenina.txt``.

Predicted speedup (reference/speculative.md): with ``E = (1 - alpha^(g+1)) / (1 - alpha)``
tokens per round, ``speedup = E * t_target(1) / (g * t_draft(1) + t_target(g + 1))``, the
costs measured here with the KV cache (a CPU scores g + 1 tokens slower than one).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fides.bench.serving import _machine
from fides.defaults.text import (
    TextRecipe,
    encode_corpus,
    stdlib_sources,
    train_pair,
)
from gateway.generation.engine import SpeculativeEngine
from gateway.generation.params import SamplingParams
from gateway.generation.runtime import CausalLM, load_causal_lm, load_tokenizer
from gateway.generation.schedule import Lookahead
from verifier.distillspec import DistillSpecConfig, evaluate_divergences
from verifier.lm import acceptance, windows

Log = Callable[[str], None]
PROMPT_LEN = 48


def _time_forward(lm: CausalLM, n: int, context: int = 112, reps: int = 12) -> list[float]:
    """Seconds to score ``n`` new tokens after ``context`` cached ones (``reps`` samples;
    112 = the middle of the benchmark's 48-token prompts + 128 new tokens)."""
    cache = lm.new_cache()
    lm.forward(list(range(1, context + 1)), cache, keep=1)
    times = []
    for i in range(reps + 2):
        t = time.perf_counter()
        lm.forward([5] * n, cache, keep=n)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
        cache.crop(context)
    return times


def _ours(engine: SpeculativeEngine, prompt: list[int], params: SamplingParams) -> list[float]:
    """[tokens, seconds, rounds, draft tokens, accepted] for one prompt."""
    t0 = time.perf_counter()
    seq = engine.start(prompt, params)
    while seq.finished is None:
        engine.step(seq)
    dt = time.perf_counter() - t0
    st = seq.stats
    return [len(seq.generated), dt, st["rounds"], st["draft_tokens"], st["accepted"]]


def _hf(
    target: Any, draft: Any | None, prompt: list[int], new: int, temp: float, gamma: int, seed: int
) -> list[float]:
    """[tokens, seconds] of Hugging Face generate for one prompt (assisted with a draft)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": temp > 0,
        "pad_token_id": 0,
    }
    if temp > 0:
        kwargs.update(temperature=temp, top_k=None, top_p=None)
    if draft is not None:
        kwargs["assistant_model"] = draft
        draft.generation_config.num_assistant_tokens = gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
    torch.manual_seed(seed)
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return [out.shape[1] - x.shape[1], time.perf_counter() - t0]


def _interleaved(
    target: CausalLM,
    draft: CausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    gamma: int,
    costs: dict[str, list[float]],
) -> dict[str, list[float]]:
    """Every method on prompt 1, then every method on prompt 2, ...: a burst of load from
    elsewhere on the machine then slows all methods alike instead of one. The forward costs
    behind the prediction are sampled between prompts too (into ``costs``)."""
    plain = SpeculativeEngine(target, None, Lookahead(0), 10**9)
    spec = SpeculativeEngine(target, draft, Lookahead(gamma), 10**9)
    totals: dict[str, list[float]] = {
        "target_only": [0.0] * 5,
        "speculative": [0.0] * 5,
        "hf_target_only": [0.0] * 2,
        "hf_assisted": [0.0] * 2,
    }
    n, temp = params.max_tokens, params.temperature
    for i, prompt in enumerate(prompts):
        seeded = SamplingParams(**{**params.__dict__, "seed": i})
        runs = {
            "target_only": _ours(plain, prompt, seeded),
            "speculative": _ours(spec, prompt, seeded),
            "hf_target_only": _hf(target.model, None, prompt, n, temp, gamma, i),
            "hf_assisted": _hf(target.model, draft.model, prompt, n, temp, gamma, i),
        }
        for key, vals in runs.items():
            totals[key] = [a + b for a, b in zip(totals[key], vals, strict=True)]
        costs["target_1"] += _time_forward(target, 1)
        costs["target_g"] += _time_forward(target, gamma + 1)
        costs["draft_1"] += _time_forward(draft, 1)
    return totals


def _rate(vals: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens_per_s": round(vals[0] / vals[1], 1)}
    if len(vals) == 5:
        out["tokens_per_round"] = round(vals[0] / vals[2], 3)
        if vals[3]:
            out["acceptance_rate"] = round(vals[4] / vals[3], 4)
    return out


def predicted_speedup(alpha: float, gamma: int, t1: float, tg: float, td: float) -> float:
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1
    return expected * t1 / (gamma * td + tg)


def bench_pair(
    name: str,
    vdir: Path,
    train_ids: torch.Tensor,
    held_ids: torch.Tensor,
    log: Log,
    *,
    gamma: int,
    prompts: int,
    new_tokens: int,
    distill_steps: int,
) -> dict[str, Any]:
    target = load_causal_lm(vdir)
    draft = load_causal_lm(vdir / "draft")
    g = torch.Generator().manual_seed(0)
    batch = windows(held_ids, prompts, PROMPT_LEN, g)  # [n, P]
    prompt_list = batch.tolist()
    result: dict[str, Any] = {
        "gamma": gamma,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "modes": {},
    }
    samples: dict[str, list[float]] = {"target_1": [], "target_g": [], "draft_1": []}
    for mode, temp in (("greedy", 0.0), ("t1", 1.0)):
        params = SamplingParams(max_tokens=new_tokens, temperature=temp)
        samples = {"target_1": [], "target_g": [], "draft_1": []}
        totals = _interleaved(target, draft, prompt_list, params, gamma, samples)
        t1, tg, td = (statistics.median(samples[k]) for k in ("target_1", "target_g", "draft_1"))
        costs = {
            "t_target_1_ms": round(t1 * 1e3, 3),
            f"t_target_{gamma + 1}_ms": round(tg * 1e3, 3),
            "t_draft_1_ms": round(td * 1e3, 3),
            "c": round(td / t1, 4),
        }
        base, ours = _rate(totals["target_only"]), _rate(totals["speculative"])
        hf_plain, hf_assist = _rate(totals["hf_target_only"]), _rate(totals["hf_assisted"])
        alpha = acceptance(target.model, draft.model, batch, new_tokens, temp, seed=0)
        pred = predicted_speedup(alpha, gamma, t1, tg, td)
        speedup = ours["tokens_per_s"] / base["tokens_per_s"]
        row = {
            "target_only": base,
            "speculative": ours,
            "hf_target_only": hf_plain,
            "hf_assisted": hf_assist,
            "costs": costs,
            "alpha": round(alpha, 4),
            "speedup_vs_target_only": round(speedup, 3),
            "speedup_vs_hf_assisted": round(ours["tokens_per_s"] / hf_assist["tokens_per_s"], 3),
            "predicted_speedup": round(pred, 3),
            "measured_over_predicted": round(speedup / pred, 3),
        }
        result["modes"][mode] = row
        log(
            f"{name} {mode}: {ours['tokens_per_s']} tok/s speculative vs {base['tokens_per_s']} "
            f"target-only ({speedup:.2f}x; predicted {pred:.2f}x from alpha {alpha:.3f}, "
            f"costs {costs}); "
            f"HF assisted {hf_assist['tokens_per_s']} tok/s, HF target-only "
            f"{hf_plain['tokens_per_s']} tok/s"
        )
    if distill_steps:
        corpus_draft = load_causal_lm(vdir / "draft-corpus").model
        runs = evaluate_divergences(
            target.model,
            corpus_draft,
            train_ids,
            held_ids,
            DistillSpecConfig(steps=distill_steps),
        )
        result["distillspec"] = {
            d: {"before": r.before, "after": r.after, "seconds": r.seconds} for d, r in runs.items()
        }
        for d, r in runs.items():
            log(
                f"{name} DistillSpec {d}: greedy {r.before['greedy']:.3f} -> "
                f"{r.after['greedy']:.3f}, T=1 {r.before['t1']:.3f} -> {r.after['t1']:.3f}"
            )
    return result


def _book_chunks(path: Path, size: int = 4000) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [text[i : i + size] for i in range(0, len(text), size)]


def _ensure_book_pair(data: Path, cache: Path, log: Log) -> Path | None:
    train, held = data / "war_and_peace.txt", data / "anna_karenina.txt"
    if not (train.is_file() and held.is_file()):
        log(f"no {train} / {held}: skipping the war_and_peace pair")
        return None
    vdir = cache / "war_and_peace" / "1"
    if not (vdir / "draft-corpus" / "config.json").is_file():
        log(f"training the war_and_peace pair into {vdir} (minutes)")
        pair = train_pair(
            _book_chunks(train),
            _book_chunks(held)[:60],
            TextRecipe(),
            seed=0,
            say=log,
            label="war_and_peace",
        )
        pair.save(vdir)
        (vdir / "report.json").write_text(json.dumps(pair.report, indent=2), encoding="utf-8")
    return vdir


def run_speculative_bench(
    repository: Path,
    output: Path,
    log: Log,
    *,
    data: Path = Path("../shared/data"),
    cache: Path = Path("runs/speculative"),
    gamma: int = 4,
    prompts: int = 12,
    new_tokens: int = 128,
    distill_steps: int = 30,
    threads: int = 1,
    pairs: tuple[str, ...] = ("code", "war_and_peace"),
) -> dict[str, Any]:
    """Benchmark the ``pairs`` asked for; other pairs already in ``output`` are kept."""
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"machine": _machine(), "torch_threads": threads, "pairs": {}}
    if output.is_file():
        kept = json.loads(output.read_text(encoding="utf-8")).get("pairs", {})
        results["pairs"] = {k: v for k, v in kept.items() if k not in pairs}
    code = repository / "code" / "1"
    if "code" not in pairs:
        pass
    elif (code / "config.json").is_file():
        tok = load_tokenizer(code)
        train_texts, held_texts = stdlib_sources(TextRecipe())
        results["pairs"]["code"] = bench_pair(
            "code",
            code,
            encode_corpus(tok, train_texts),
            encode_corpus(tok, held_texts),
            log,
            gamma=gamma,
            prompts=prompts,
            new_tokens=new_tokens,
            distill_steps=distill_steps,
        )
    else:
        log(f"no default pair in {code}: run `fides models build-default`")
    book = _ensure_book_pair(data, cache, log) if "war_and_peace" in pairs else None
    if book is not None:
        tok = load_tokenizer(book)
        train_ids = encode_corpus(tok, _book_chunks(data / "war_and_peace.txt"))
        held_ids = encode_corpus(tok, _book_chunks(data / "anna_karenina.txt")[:60])
        results["pairs"]["war_and_peace"] = bench_pair(
            "war_and_peace",
            book,
            train_ids,
            held_ids,
            log,
            gamma=gamma,
            prompts=prompts,
            new_tokens=new_tokens,
            distill_steps=distill_steps,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    log(f"results in {output} and {output.with_suffix('.md')}")
    return results


def markdown(results: dict[str, Any]) -> str:
    """The README tables: speed per pair and mode, then DistillSpec per divergence."""
    lines = [
        "| pair | decoding | target-only tok/s | speculative tok/s | speedup | HF target-only "
        "tok/s | HF assisted tok/s | vs HF assisted | alpha | c | predicted | measured / "
        "predicted | tokens / round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pair in results["pairs"].items():
        for mode, row in pair["modes"].items():
            lines.append(
                f"| {name} | {'greedy' if mode == 'greedy' else 'T=1'} "
                f"| {row['target_only']['tokens_per_s']} | {row['speculative']['tokens_per_s']} "
                f"| {row['speedup_vs_target_only']:.2f}x | {row['hf_target_only']['tokens_per_s']} "
                f"| {row['hf_assisted']['tokens_per_s']} | {row['speedup_vs_hf_assisted']:.2f}x "
                f"| {row['alpha']:.3f} | {row['costs']['c']:.3f} "
                f"| {row['predicted_speedup']:.2f}x "
                f"| {row['measured_over_predicted']:.2f} "
                f"| {row['speculative']['tokens_per_round']:.2f} |"
            )
    lines += [
        "",
        "| pair | divergence | greedy alpha before | after | T=1 alpha before | after |",
        "|---|---|---|---|---|---|",
    ]
    for name, pair in results["pairs"].items():
        for div, r in pair.get("distillspec", {}).items():
            lines.append(
                f"| {name} | {div} | {r['before']['greedy']:.3f} | {r['after']['greedy']:.3f} "
                f"| {r['before']['t1']:.3f} | {r['after']['t1']:.3f} |"
            )
    return "\n".join(lines) + "\n"
