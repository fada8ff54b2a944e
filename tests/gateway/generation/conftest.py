"""Tiny real models shared by the generation tests (built once per session)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fides.defaults.text import LMSpec
from gateway.generation.runtime import CausalLM, load_causal_lm, load_tokenizer
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving
from tests.gateway.generation.factory import make_lm_repository, perturbed, save


@dataclass
class Pair:
    target: CausalLM
    near: CausalLM  # the target plus a little noise: accepts often, rejects sometimes
    far: CausalLM  # an unrelated random model: rejects most drafts
    tokenizer: Any


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run 3x faster on one intra-op thread than on two (2-core machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lm_repository(tmp_path_factory.mktemp("lm") / "repo")


@pytest.fixture(scope="session")
def pair(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    vdir = lm_repo / "tiny" / "1"
    target = load_causal_lm(vdir)
    tok = load_tokenizer(vdir)
    base = tmp_path_factory.mktemp("drafts")
    near = save(perturbed(target.model, 0.02, seed=3), None, base / "near")
    spec = LMSpec(layers=1, dim=32, heads=2, vocab_size=target.vocab_size, context=128)
    far = save(spec.build(seed=7), None, base / "far")
    return Pair(target, load_causal_lm(near), load_causal_lm(far), tok)


@pytest.fixture
async def client(lm_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway serving ``lm_repo`` in process, a client holding the user key."""
    settings = Settings(
        model_repository=lm_repo, api_keys=[USER_KEY], log_json=False, shutdown_grace_s=1
    )
    async with serving(settings) as c:
        yield c
