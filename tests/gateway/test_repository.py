"""The model repository without HTTP (as KServe's and MLServer's repository tests): discovery,
one registry for every kind of model, version rules, hot reload, slots and the wrap hook."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ModelLoadError, NotFound, Unavailable
from gateway.model_config import ModelConfig
from gateway.repository import ModelRepository
from gateway.servables import InferContext, Servable, TensorServable
from tests.model_factory import TINY_CONFIG, make_repository, tiny_classifier, write_config

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[ModelRepository]:
    repository = ModelRepository(make_repository(tmp_path / "repo", datatypes=("FP32",)))
    await repository.load_all()
    yield repository
    await repository.close()


async def test_every_model_on_disk_loads_into_one_registry(repo: ModelRepository) -> None:
    assert repo.loaded_names() == ["identity_fp32", "tiny"]
    assert repo.ready() == (True, [])
    tiny = repo.get("tiny")
    assert isinstance(tiny, TensorServable)
    assert (tiny.name, tiny.version, tiny.platform) == ("tiny", 2, "onnx")  # latest by default
    assert sorted(repo.served("tiny").versions) == [1, 2]
    assert repo.get("tiny", "1").version == 1


async def test_a_servable_answers_through_its_batcher(repo: ModelRepository) -> None:
    done = await repo.get("tiny", "1").infer({"input": X}, InferContext(deadline=_later()))
    assert set(done.outputs) == {"logits", "probabilities"}
    assert done.parameters == {}
    np.testing.assert_allclose(done.outputs["probabilities"].sum(1), 1.0, rtol=1e-6)


async def test_unknown_models_and_versions(repo: ModelRepository) -> None:
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        repo.get("nope")
    with pytest.raises(NotFound, match="no loaded version 7"):
        repo.get("tiny", "7")
    await repo.unload("tiny")
    with pytest.raises(Unavailable, match="not ready: unloaded"):
        repo.get("tiny")


async def test_a_broken_reload_keeps_the_serving_versions(repo: ModelRepository) -> None:
    serving = repo.get("tiny")
    (repo.root / "tiny" / "3").mkdir()
    (repo.root / "tiny" / "3" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match=r"model 'tiny': cannot load .*tiny/3/model.onnx"):
        await repo.load("tiny")
    assert repo.get("tiny") is serving
    assert not serving.closed


async def test_a_slot_follows_reloads_without_a_lookup(repo: ModelRepository) -> None:
    slot = repo.slot("tiny")
    first = slot.latest()
    tiny_classifier(repo.root / "tiny" / "3" / "model.onnx")
    await repo.load("tiny")
    assert slot.latest() is not first
    assert slot.latest().version == 3
    assert first.closed  # the old version drained and unloaded
    await repo.unload("tiny")
    with pytest.raises(Unavailable, match="unloaded"):
        slot.latest()
    with pytest.raises(Unavailable, match="not loaded"):
        repo.slot("later").latest()


async def test_the_wrap_hook_serves_what_it_returns_and_refuses_alone(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo", datatypes=())
    seen: list[tuple[str, int]] = []

    class Marked(TensorServable):
        pass

    async def wrap(name: str, cfg: ModelConfig, versions: list[TensorServable]) -> list[Servable]:
        if cfg.parameters.get("refuse") == "yes":
            raise ModelLoadError(f"model '{name}': refused by the hook")
        seen.extend((name, v.version) for v in versions)
        return [Marked(v.runtime, v.batcher) for v in versions]

    repository = ModelRepository(root)
    repository.wrap = wrap
    await repository.load_all()
    try:
        assert isinstance(repository.get("tiny"), Marked)
        assert seen == [("tiny", 1), ("tiny", 2)]
        write_config(root / "tiny", {**TINY_CONFIG, "parameters": {"refuse": "yes"}})
        with pytest.raises(ModelLoadError, match="refused by the hook"):
            await repository.load("tiny")
        assert isinstance(repository.get("tiny"), Marked)  # the old versions still serve
    finally:
        await repository.close()


async def test_an_upstream_model_needs_no_version_folder(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    write_config(
        root / "remote",
        {
            "platform": "upstream",
            "max_batch_size": 4,
            "upstream": {"url": "http://127.0.0.1:9", "retries": 0, "timeout_s": 0.2},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}],
        },
    )
    repository = ModelRepository(root)
    await repository.load_all()
    try:
        assert repository.get("remote").version == 1
    finally:
        await repository.close()


def _later() -> float:
    import time

    return time.monotonic() + 10


async def test_a_misnamed_model_directory_is_listed_with_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_repository(tmp_path / "repo", datatypes=())
    for odd in ("my model", "a..b", "é"):
        write_config(root / odd, TINY_CONFIG)
    write_config(root / ".hidden", TINY_CONFIG)  # hidden: left alone, as .git or ..data
    repository = ModelRepository(root)
    try:
        with caplog.at_level("ERROR", logger="gateway.repository"):
            await repository.load_all()
        # they were skipped without a word: not served, not in the index, nothing logged
        rows = {r["name"]: r for r in repository.index()}
        assert sorted(rows) == ["a..b", "my model", "tiny", "é"]
        for odd in ("my model", "a..b", "é"):
            assert rows[odd]["state"] == "UNAVAILABLE"
            assert rows[odd]["reason"].startswith("invalid model name: use 1-128 ASCII")
            assert f"model directory {odd!r} is not served: invalid model name" in caplog.text
        assert repository.loaded_names() == ["tiny"]
        assert repository.ready() == (True, [])
    finally:
        await repository.close()
