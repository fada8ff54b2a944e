"""Loading causal-LM models from the repository: vocabulary checks, config, text helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fides.defaults.text import LMSpec, train_tokenizer
from gateway.errors import ModelLoadError
from gateway.generation.metrics import GenerationMetrics
from gateway.generation.service import GenerationService, load_text_model
from gateway.generation.text import Detokenizer
from gateway.model_config import ConfigError, load_model_config
from gateway.repository import ModelRepository
from tests.gateway.generation.factory import make_lm_repository, save, tokenizer


def load(root: Path, name: str = "tiny") -> object:
    path = root / name
    return load_text_model(name, path, load_model_config(path / "config.yaml", name))


def test_draft_with_another_vocabulary_size_is_refused(tmp_path: Path) -> None:
    root = make_lm_repository(tmp_path / "repo")
    draft_dir = root / "tiny" / "1" / "draft"
    spec = LMSpec(layers=1, dim=32, heads=2, vocab_size=512, context=128)
    save(spec.build(seed=0), None, draft_dir)
    with pytest.raises(ModelLoadError, match="vocabulary of 512 tokens.*must share a tokenizer"):
        load(root)


def test_draft_with_another_tokenizer_of_the_same_size_is_refused(tmp_path: Path) -> None:
    root = make_lm_repository(tmp_path / "repo")
    draft_dir = root / "tiny" / "1" / "draft"
    other = train_tokenizer(
        ["completely different text " * 50, "zzz yyy xxx 123"], len(tokenizer())
    )
    other.save_pretrained(draft_dir)
    with pytest.raises(ModelLoadError, match="different tokenizer"):
        load(root)


async def test_broken_model_is_reported_on_use_not_fatal(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    root = make_lm_repository(tmp_path / "repo")
    (root / "tiny" / "1" / "draft" / "config.json").write_text("{broken", encoding="utf-8")
    repository = ModelRepository(root)
    await repository.load_all()  # logged, not fatal
    svc = GenerationService(repository, GenerationMetrics(CollectorRegistry()))
    assert svc.models() == []
    with pytest.raises(Exception, match="failed to load"):
        svc.get("tiny")
    assert repository.ready() == (False, ["tiny"])  # one registry: readiness says so too
    await repository.close()


def test_generation_block_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"platform": "causal_lm", "generation": {"num_speculative_tokenz": 3}})
    )
    with pytest.raises(ConfigError, match="unknown key 'generation.num_speculative_tokenz'"):
        load_model_config(path)
    path.write_text(yaml.safe_dump({"platform": "onnx", "generation": {}}))
    with pytest.raises(ConfigError, match="needs platform 'causal_lm'"):
        load_model_config(path)


def test_detokenizer_holds_back_stop_prefixes() -> None:
    tok = tokenizer()
    text = "def main():\n    return 42\n"
    ids = tok.encode(text)
    det = Detokenizer(tok, ["return"])
    out = ""
    stopped = False
    for t in ids:
        delta, stopped = det.add([t])
        out += delta
        assert "retur" not in out  # a prefix of the stop never leaks
        if stopped:
            break
    assert stopped
    assert out == "def main():\n    "
    det = Detokenizer(tok, [])
    streamed = "".join(det.add([t])[0] for t in tok.encode("héllo wörld ✓"))
    assert streamed + det.flush() == "héllo wörld ✓"


class _Chars:
    """A tokenizer whose tokens are characters (ids index ``alphabet``)."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.alphabet[i] for i in ids)


def _held_back_reference(text: str, stops: list[str], sent: int) -> int:
    """Where the old Detokenizer stopped sending: before the longest stop prefix the text ends
    with, searched over the whole text."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return max(len(text) - hold, sent)


def test_detokenizer_holds_back_what_the_whole_text_search_held_back() -> None:
    """The stop-prefix search looks only at text not sent yet (so a 20,000-character stop costs
    what a short one does); what it sends, token by token, is what a search over the whole
    text sends, on random texts over a small alphabet with random stops, long ones too."""
    rng = np.random.default_rng(5)
    alphabet = "ab c"
    tok = _Chars(alphabet)
    for _ in range(300):
        stops = [
            "".join(rng.choice(list(alphabet), size=int(rng.integers(1, 12))))
            for _ in range(int(rng.integers(1, 4)))
        ]
        ids = [int(i) for i in rng.integers(0, len(alphabet), size=60)]
        det = Detokenizer(tok, stops)
        sent = 0
        for n in range(1, len(ids) + 1):
            delta, stopped = det.add([ids[n - 1]])
            if stopped:
                break
            text = tok.decode(ids[:n])
            expect = _held_back_reference(text, stops, sent)
            assert sent + len(delta) == expect, (stops, text)
            sent = expect
    long_stop = "x" * 20_000 + "y"
    det = Detokenizer(_Chars("xz"), [long_stop])
    out = "".join(det.add([i % 2])[0] for i in range(4096))  # "xzxz...": never a stop
    assert out + det.flush() == "xz" * 2048


def test_a_draft_with_a_shorter_context_is_refused(tmp_path: Path) -> None:
    root = make_lm_repository(tmp_path / "repo", context=128)
    draft_dir = root / "tiny" / "1" / "draft"
    spec = LMSpec(layers=1, dim=32, heads=2, vocab_size=len(tokenizer()), context=64)
    save(spec.build(seed=0), None, draft_dir)
    with pytest.raises(ModelLoadError, match="draft's max_position_embeddings 64 is below"):
        load(root)
    # within the draft's context it loads
    cfg = yaml.safe_load((root / "tiny" / "config.yaml").read_text(encoding="utf-8"))
    cfg["generation"]["max_context"] = 64
    (root / "tiny" / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert load(root) is not None


def test_a_sliding_window_model_is_refused(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    root = make_lm_repository(tmp_path / "repo")
    tok = tokenizer()
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        sliding_window=16,
        eos_token_id=tok.eos_token_id,
    )
    save(MistralForCausalLM(cfg), tok, root / "tiny" / "1")
    with pytest.raises(ModelLoadError, match="target's cache has DynamicSlidingWindowLayer"):
        load(root)
