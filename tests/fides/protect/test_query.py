"""The query client against an MLaaS that misbehaves on purpose (tests/fides/protect/
conftest.py): every answer paid for is recorded once, a rerun asks only for what is missing,
and each bad answer or HTTP failure is an error that names the problem."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fides.protect.config import QueryConfig, parse_protect_config
from fides.protect.query import (
    AnswerError,
    BudgetExhausted,
    Querier,
    QueryFailed,
    _RateLimiter,
    answer_kind,
    as_probabilities,
)
from fides.protect.service import Service, ServiceError, open_service
from fides.protect.store import AnswerStore, StoreError, input_key
from gateway.model_config import UpstreamOptions
from tests.fides.protect.conftest import (
    KEY,
    MLaaS,
    closing,
    open_querier,
    open_upstream,
    protect_raw,
    upstream,
)
from tests.model_factory import nan_on_blank, write_config
from verifier.data import load_digits_arrays

X = load_digits_arrays(0)[0][:300]  # [300, 1, 8, 8] float32 in [0, 1]


pytestmark = pytest.mark.usefixtures("protect_clients")


def test_each_answer_is_paid_for_once_and_a_rerun_asks_nothing(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    x = np.concatenate([X, X[:50]])  # repeats inside one call are asked once
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    first = q.answers(x)
    assert first.shape == (350, 10)
    np.testing.assert_allclose(first[:50], first[300:])
    assert mlaas.rows_answered == q.store.spent == len(q.store) == 300
    again = open_querier(mlaas, tmp_path / "a.sqlite")  # a new process on the same store
    np.testing.assert_array_equal(again.answers(x), first)
    assert mlaas.rows_answered == 300


def test_an_exhausted_budget_stops_cleanly_and_a_larger_one_resumes(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite", budget=100)
    with pytest.raises(
        BudgetExhausted,
        match=r"100 inputs paid for of --max-queries 100, 200 more needed for the inputs"
        r".*later stages.*at least 300",
    ):
        q.answers(X)
    assert mlaas.rows_answered == q.store.spent == len(q.store) == 100  # what fits is kept
    q2 = open_querier(mlaas, tmp_path / "a.sqlite", budget=300)
    assert q2.answers(X).shape == (300, 10)
    assert mlaas.rows_answered == 300  # nothing asked twice


def test_429_and_503_are_retried_with_backoff(mlaas: MLaaS, tmp_path: Path) -> None:
    mlaas.fail_with, mlaas.fail_times = 429, 2
    q = open_querier(mlaas, tmp_path / "a.sqlite", rate_limit=200.0)
    assert q.answers(X[:64]).shape == (64, 10)
    mlaas.fail_with, mlaas.fail_times = 503, 1
    assert q.answers(X[64:128]).shape == (64, 10)
    assert mlaas.rows_answered == 128


def test_a_failing_upstream_is_named_and_what_it_answered_is_kept(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:64])
    mlaas.fail_with, mlaas.fail_times = 500, 10**6
    with pytest.raises(QueryFailed, match=r"HTTP 500"):
        q.answers(X)
    assert len(q.store) == 64


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_say_so(mlaas: MLaaS, tmp_path: Path, status: int) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    mlaas.fail_with, mlaas.fail_times = status, 10**6
    with pytest.raises(QueryFailed, match=rf"HTTP {status}.*check the credentials"):
        q.answers(X[:10])


def test_a_missing_key_is_named_before_any_query(
    mlaas: MLaaS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROTECT_TEST_AUTH")
    with pytest.raises(ServiceError, match="environment variable PROTECT_TEST_AUTH is unset"):
        open_upstream(mlaas.url)
    monkeypatch.setenv("PROTECT_TEST_AUTH", "Bearer wrong")
    with pytest.raises(ServiceError, match="HTTP 401"):  # the metadata call is refused
        open_upstream(mlaas.url)


def test_a_key_from_a_file(mlaas: MLaaS, tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(f"Bearer {KEY}\n")
    service = open_upstream(
        mlaas.url, headers_from_env={}, headers_from_file={"Authorization": str(secret)}
    )
    assert service.ask(X[:2]).shape == (2, 10)
    missing = tmp_path / "nope"
    with pytest.raises(ServiceError, match=f"cannot read {missing}"):
        open_upstream(
            mlaas.url, headers_from_env={}, headers_from_file={"Authorization": str(missing)}
        )


def test_an_unreachable_upstream_is_named(tmp_path: Path) -> None:
    options = UpstreamOptions(url="http://127.0.0.1:9", model_name="digits", retries=0)
    with pytest.raises(ServiceError, match="cannot read the upstream model's metadata"):
        open_service(repository=None, model=None, upstream=options, output=None, max_batch_size=64)


def test_nan_answers_are_named_and_paid_for(mlaas: MLaaS, tmp_path: Path) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    mlaas.mode = "nan"
    with pytest.raises(AnswerError, match="must be numbers"):
        q.answers(X[:64])
    assert q.store.spent == 64  # both batches came back unusable, and were paid for
    assert len(q.store) == 0


def _nan_on_blank_service(root: Path) -> Service:
    """A repository model that answers NaN for a blank image (and only for one)."""
    write_config(root / "nanny", {"platform": "onnx", "max_batch_size": 64})
    nan_on_blank(root / "nanny" / "1" / "model.onnx")
    service = open_service(
        repository=root, model="nanny", upstream=None, output=None, max_batch_size=64
    )
    closing(service)
    return service


def test_inputs_answered_nan_are_recorded_and_not_paid_for_again(tmp_path: Path) -> None:
    service = _nan_on_blank_service(tmp_path / "repo")
    x = X[:64].copy()
    x[[3, 40]] = 0.0  # one blank image (twice, asked once): a NaN row, the other 62 answered
    store_path = tmp_path / "a.sqlite"
    cfg = QueryConfig(batch_size=32, concurrency=2)

    def querier() -> Querier:  # a new run: a new store handle on the same file
        store = AnswerStore(store_path, f"{service.identity}, output {service.output}")
        closing(store)
        return Querier(service, store, cfg)

    q = querier()
    with pytest.raises(AnswerError, match=r"non-finite values .* for 1 of 63"):
        q.answers(x)
    assert q.store.spent == 63
    assert len(q.store) == 62
    rerun = querier()
    with pytest.raises(
        AnswerError, match=r"1 of the inputs were answered with unusable .* input #3"
    ):
        rerun.answers(x)
    assert rerun.store.spent == 63  # nothing asked: named at once
    assert rerun.answers(x[np.r_[0:3, 4:40, 41:64]]).shape == (62, 10)  # the others: recorded
    assert rerun.store.spent == 63
    assert rerun.store.forget_unusable() == 1  # --retry-unusable
    with pytest.raises(AnswerError, match="for 1 of 1"):
        rerun.answers(x)  # asked once more (still NaN): only the blank one
    assert rerun.store.spent == 64


def _unusable_rows(q: Querier, x: np.ndarray) -> list[int]:
    """The rows of ``x`` the store records as answered unusably."""
    keys = [input_key(row) for row in q.service.encode(x)]
    unusable = q.store.unusable(keys)
    return [i for i, k in enumerate(keys) if k in unusable]


@pytest.mark.parametrize(
    ("bad_mode", "why"),
    [
        ("short", r"shape \[31, 10\] but the batch has 32 row"),  # the wrong shape
        ("nan", "must be numbers"),  # JSON null: the body cannot be decoded
    ],
)
def test_a_batch_answered_unusably_as_a_whole_is_not_paid_for_again(
    mlaas: MLaaS, tmp_path: Path, bad_mode: str, why: str
) -> None:
    """A batch whose answer is unusable as a whole was paid for: each of its inputs is
    recorded as unusable, so a rerun names them instead of sending (and paying for) them
    again, as for a NaN row; --retry-unusable asks once more."""
    x = X[:96]  # 3 batches of 32, all in flight at once
    mlaas.bad_mode, mlaas.bad_times = bad_mode, 1  # the first request the provider gets
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(AnswerError, match=why) as first:
        q.answers(x)
    served = mlaas.rows_answered  # what the provider answered (and bills)
    assert q.store.spent == served
    bad = _unusable_rows(q, x)
    assert len(bad) == 32
    assert len(q.store) == served - 32
    assert "the batch's 32 inputs are recorded as unusable" in str(first.value)
    rerun = open_querier(mlaas, tmp_path / "a.sqlite")  # a new run on the same store
    with pytest.raises(
        AnswerError,
        match=rf"32 of the inputs were answered with unusable values by an earlier run "
        rf"\(its batch was answered unusably: .*{why}.*; first: input #{bad[0]}\).*"
        r"--retry-unusable",
    ):
        rerun.answers(x)
    assert mlaas.rows_answered == rerun.store.spent == served  # nothing sent again
    good = np.setdiff1d(np.arange(len(x)), bad)
    assert rerun.answers(x[good]).shape == (64, 10)
    assert mlaas.rows_answered == rerun.store.spent == 96  # only what was never asked
    assert rerun.store.forget_unusable() == 32  # --retry-unusable
    assert rerun.answers(x).shape == (96, 10)
    assert mlaas.rows_answered == rerun.store.spent == 128  # those 32, once more


def test_a_probe_batch_answered_unusably_is_not_paid_for_again(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:64])
    mlaas.bad_times = 1  # the repeat's first batch comes back with the wrong shape
    with pytest.raises(AnswerError, match=r"\[31, 10\]") as first:
        q.repeat_probe(X[:64])
    assert mlaas.rows_answered == q.store.spent == 96
    assert len(_unusable_rows(q, X[:64])) == 32  # their repeats' answer
    assert "the batch's 32 inputs are recorded as unusable" in str(first.value)
    rerun = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(
        AnswerError,
        match=r"32 of the probe inputs were answered with unusable values by an earlier run "
        r"\(its batch was answered unusably: .*; first: input #0\).*--retry-unusable",
    ):
        rerun.repeat_probe(X[:64])
    assert mlaas.rows_answered == 96  # not asked again
    assert rerun.answers(X[:64]).shape == (64, 10)  # their recorded answers stay usable
    assert rerun.store.forget_unusable() == 32  # --retry-unusable
    assert rerun.repeat_probe(X[:64])["inputs"] == 64
    assert mlaas.rows_answered == rerun.store.spent == 96 + 64


def test_the_reason_recorded_for_an_unusable_batch_is_short() -> None:
    """Without the service's name (the store is its own), cut in the middle: what failed,
    and what was wrong with the answer, survive a long URL."""
    from fides.protect.query import REASON_CHARS, _batch_reason

    message = (
        "svc: upstream returned an invalid response: https://api.example/"
        + "v" * 400
        + "/infer: output 'p' has shape [31, 10] but the batch has 32 row(s)"
    )
    reason = _batch_reason(message, "svc")
    assert len(reason) <= REASON_CHARS
    assert reason.startswith("its batch was answered unusably: upstream returned an invalid")
    assert reason.endswith("has shape [31, 10] but the batch has 32 row(s)")
    assert _batch_reason("svc answered [31] for a batch of 32", "svc") == (
        "its batch was answered unusably: answered [31] for a batch of 32"
    )


@pytest.mark.parametrize("when", ["in flight", "being recorded"])
def test_an_interrupt_keeps_a_batch_answered_unusably(
    mlaas: MLaaS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Ctrl-C while a batch answered unusably as a whole is in flight, or while it is
    recorded (its transaction rolls back): it is recorded as paid for and unusable."""
    import fides.protect.query as query

    q = open_querier(mlaas, tmp_path / "a.sqlite")
    if when == "in flight":

        def interrupted(fs: Any, timeout: float | None, return_when: str) -> Any:
            wait(fs)  # every request in flight is answered, then Ctrl-C lands
            raise KeyboardInterrupt

        monkeypatch.setattr(query, "wait", interrupted)
    else:
        real_put = q.store.put_unusable

        def interrupted_once(*args: Any, **kwargs: Any) -> None:
            monkeypatch.setattr(q.store, "put_unusable", real_put)
            raise KeyboardInterrupt

        monkeypatch.setattr(q.store, "put_unusable", interrupted_once)
    mlaas.bad_times = 1
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:96])
    # 3 batches submitted at once; one whose worker had not taken it up when the interrupt
    # landed is cancelled, never sent: whatever the provider answered (and bills) is recorded
    served = mlaas.rows_answered
    assert q.store.spent == served >= 64
    assert len(_unusable_rows(q, X[:96])) == 32
    assert len(q.store) == served - 32
    monkeypatch.setattr(query, "wait", wait)  # the interrupt is over
    rerun = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(AnswerError, match="32 of the inputs were answered with unusable"):
        rerun.answers(X[:96])
    assert mlaas.rows_answered == served


def test_a_store_is_bound_to_the_output_it_reads(tmp_path: Path) -> None:
    AnswerStore(tmp_path / "a.sqlite", "model m of r, output probabilities").close()
    with pytest.raises(StoreError, match="holds the answers of model m of r, output probab"):
        AnswerStore(tmp_path / "a.sqlite", "model m of r, output logits")
    # a store made before outputs were named is taken over, and named from then on
    AnswerStore(tmp_path / "old.sqlite", "model m of r").close()
    AnswerStore(
        tmp_path / "old.sqlite", "model m of r, output logits", legacy_ids=["model m of r"]
    ).close()
    with pytest.raises(StoreError, match="output logits"):
        AnswerStore(tmp_path / "old.sqlite", "model m of r, output probabilities")


def test_the_wrong_number_of_rows_is_named(mlaas: MLaaS, tmp_path: Path) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    mlaas.mode = "short"
    with pytest.raises((AnswerError, QueryFailed), match=r"31|shape"):
        q.answers(X[:32])


def test_logits_are_named_not_silently_softmaxed(mlaas: MLaaS, tmp_path: Path) -> None:
    mlaas.mode = "logits"
    raw = open_querier(mlaas, tmp_path / "a.sqlite").answers(X[:64])
    with pytest.raises(AnswerError, match="look like logits.*service.answers: logits"):
        answer_kind(raw, "auto", "the service")
    kind, _ = answer_kind(raw, "logits", "the service")
    p = as_probabilities(raw, kind, 10)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    with pytest.raises(AnswerError, match="not probability vectors"):
        answer_kind(raw, "probabilities", "the service")


@pytest.mark.parametrize(
    ("mode", "kind", "k"),
    [
        ("ok", "probabilities", 10),
        ("top2", "top_k", 2),
        ("label", "label", 1),
        ("index", "label", 1),
    ],
)
def test_answer_kinds_are_recognised(
    mlaas: MLaaS, tmp_path: Path, mode: str, kind: str, k: int
) -> None:
    mlaas.mode = mode
    raw = open_querier(mlaas, tmp_path / "a.sqlite").answers(X[:64])
    assert answer_kind(raw, "auto", "the service") == (kind, k)
    p = as_probabilities(raw, kind, 10)  # type: ignore[arg-type]
    assert p.shape == (64, 10)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    mlaas.mode = "ok"
    honest = open_querier(mlaas, tmp_path / "b.sqlite").answers(X[:64])
    assert (p.argmax(1) == honest.argmax(1)).all()  # the top-1 survives every kind


def test_non_determinism_is_measured(mlaas: MLaaS, tmp_path: Path) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:64])
    mlaas.mode = "noisy"
    probe = q.repeat_probe(X[:64])
    assert probe["inputs"] == 64
    assert probe["max_abs_diff"] > 0.01
    assert q.store.spent == 128
    assert q.repeat_probe(X[:64]) == probe  # measured once per store, not paid for again
    assert q.store.spent == 128


def test_deterministic_service_probe(mlaas: MLaaS, tmp_path: Path) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:32])
    assert q.repeat_probe(X[:32])["top1_changed"] == 0


def test_a_store_belongs_to_one_service(mlaas: MLaaS, tmp_path: Path) -> None:
    AnswerStore(tmp_path / "a.sqlite", "upstream http://elsewhere/v2/models/x").close()
    with pytest.raises(StoreError, match="holds the answers of upstream http://elsewhere"):
        open_querier(mlaas, tmp_path / "a.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable answer store"):
        AnswerStore(tmp_path / "junk.sqlite", "x")


def test_images_of_the_wrong_shape_are_refused(mlaas: MLaaS) -> None:
    service = open_upstream(mlaas.url)
    service.check_images((1, 8, 8))
    with pytest.raises(
        ServiceError, match=r"takes 'input' of shape \[1, 8, 8\].*inputs are \[3, 32, 32\]"
    ):
        service.check_images((3, 32, 32))


def test_a_model_that_is_not_a_classifier_is_refused(tmp_path: Path, mlaas: MLaaS) -> None:
    from tests.model_factory import make_repository

    mlaas.mode = "image"
    with pytest.raises(
        ServiceError, match=r"is not a classifier: output 'denoised' is FP32 \[1, 8, 8\]"
    ):
        open_upstream(mlaas.url)
    repo = make_repository(tmp_path / "repo", datatypes=("FP32",))
    with pytest.raises(ServiceError, match=r"'identity_fp32'.* is not a classifier"):
        open_service(
            repository=repo, model="identity_fp32", upstream=None, output=None, max_batch_size=8
        )
    with pytest.raises(ServiceError, match=r"outputs \['logits', 'probabilities'\]: name the"):
        open_service(repository=repo, model="tiny", upstream=None, output=None, max_batch_size=8)
    tiny = open_service(
        repository=repo, model="tiny", upstream=None, output="probabilities", max_batch_size=8
    )
    try:
        with pytest.raises(ServiceError, match=r"shape \[4\] per image"):
            tiny.check_images((1, 8, 8))
    finally:
        tiny.close()
    with pytest.raises(ServiceError, match="no model 'nope'|nope"):
        open_service(repository=repo, model="nope", upstream=None, output=None, max_batch_size=8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"views": 2, "data": {"augment": {}}}, "views needs data.augment"),
        ({"verifier": {"max_flops": None}}, "set verifier.max_flops"),
        ({"service": {}}, "exactly one of service.model and service.upstream"),
        (
            {"detector": {"substitutes": [{"name": "q", "kind": "int8"}]}},
            "kind 'int8' rounds the service's weights",
        ),
        ({"surprise": 1}, "surprise"),
        (
            {"export": {"service_name": "digits", "verifier_name": "digits"}},
            "verifier would overwrite the model it verifies",
        ),
    ],
)
def test_protect_files_are_checked(change: dict[str, Any], message: str) -> None:
    from fides.protect.config import ProtectConfigError

    raw = protect_raw(upstream("http://x"))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "service":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ProtectConfigError, match=message):
        parse_protect_config(raw)


def test_an_interrupt_while_a_batch_is_recorded_loses_nothing(
    mlaas: MLaaS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C / SIGTERM can land inside the write of an answered batch (its transaction
    rolls back): that batch was paid for, and is recorded before the interrupt goes on."""
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    real_put = q.store.put
    calls = {"n": 0}

    def interrupted_once(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real_put(*args, **kwargs)

    monkeypatch.setattr(q.store, "put", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:64])
    # the batch in hand is kept, and the other one too if it was sent before the interrupt
    # cancelled it: whatever the provider answered (and bills) is recorded, nothing more
    assert len(q.store) == q.store.spent == mlaas.rows_answered >= 32


def test_the_probe_counts_each_batch_it_pays_for(mlaas: MLaaS, tmp_path: Path) -> None:
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:64])
    mlaas.mode = "short"  # the repeat's first batch comes back unusable (and is billed)
    with pytest.raises(AnswerError, match="31, 10"):
        q.repeat_probe(X[:64])
    assert q.store.spent == 64 + 32 == mlaas.rows_answered


def test_the_rate_limit_holds_across_threads() -> None:
    """Each caller claims its own slot: 4 threads, 20 calls at 50 per second take at least
    19 intervals (the claimed slots are spaced; sleeping never ends early)."""
    limiter = _RateLimiter(50.0)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: limiter.wait(), range(20)))
    assert time.monotonic() - t0 >= 19 / 50 * 0.99


def _rows(rng: np.random.Generator, n: int = 50, classes: int = 10) -> np.ndarray:
    p = rng.dirichlet(np.full(classes, 0.3), size=n)
    return p.astype(np.float32)


def test_answer_kinds_at_the_edges() -> None:
    rng = np.random.default_rng(0)
    p = _rows(rng)
    # probabilities rounded for a JSON API, to 3 and to 2 decimals: still probabilities
    for decimals in (3, 2):
        rounded = np.round(p, decimals)
        assert answer_kind(rounded, "auto", "svc") == ("probabilities", 10)
        np.testing.assert_allclose(
            as_probabilities(rounded, "probabilities", 10).sum(1), 1, atol=1e-5
        )
    # float16 rows that sum to 1 with entries underflowed to 0: probabilities, not top-k
    half = p.copy()
    half[half < 0.01] = 0.0
    half /= half.sum(1, keepdims=True)
    half = half.astype(np.float16)
    assert (half == 0).any(axis=1).all()
    assert answer_kind(half, "auto", "svc") == ("probabilities", 10)
    assert answer_kind(half, "top_k", "svc")[0] == "top_k"  # as declared
    # one sigmoid probability per input is not a class index: refused, named
    sigmoid = rng.uniform(size=(50, 1)).astype(np.float32)
    with pytest.raises(AnswerError, match="sigmoid"):
        answer_kind(sigmoid, "auto", "svc")
    whole = rng.integers(0, 10, size=(50, 1)).astype(np.float32)  # indices sent as floats
    assert answer_kind(whole, "auto", "svc") == ("label", 1)
    # one decimal over 30 classes allows no tolerance of 1.5: rows summing to 0.5 are refused
    coarse = np.zeros((50, 30), np.float32)
    coarse[:, :5] = 0.1
    with pytest.raises(AnswerError, match="do not sum to 1"):
        answer_kind(coarse, "probabilities", "svc")
    # values in [0, 1] that do not sum to 1 are not called logits
    scores = rng.uniform(size=(50, 10)).astype(np.float32)
    with pytest.raises(AnswerError, match="do not sum to 1") as err:
        answer_kind(scores, "auto", "svc")
    assert "logits" not in str(err.value).split(":")[0]


def test_a_batch_client_honours_a_long_retry_after(mlaas: MLaaS) -> None:
    """The serving gateway waits at most 5 s for a Retry-After; the protect client, which
    answers nobody while it waits, up to 120 s unless the file says otherwise."""
    service = open_upstream(mlaas.url)
    assert service.runtime.options.max_retry_after_s == 120.0  # type: ignore[attr-defined]
    own = open_upstream(mlaas.url, max_retry_after_s=30.0)
    assert own.runtime.options.max_retry_after_s == 30.0  # type: ignore[attr-defined]


def test_a_service_answering_class_indices_is_refused_before_any_query(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """The gateway compares a probability row per answer: an integrity block for a service
    answering class indices would fail every request, so protect refuses it up front."""
    from fides.protect.run import protect

    mlaas.mode = "index"
    with pytest.raises(ServiceError, match="answers a class index per input"):
        protect(
            parse_protect_config(protect_raw(upstream(mlaas.url))),
            repository=tmp_path / "repo",
            run_dir=tmp_path / "run",
        )
    assert mlaas.rows_answered == 0


def test_an_upstream_entry_over_a_repository_model_is_refused_before_any_query(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    from fides.protect.config import ProtectConfigError
    from fides.protect.run import protect

    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "config.yaml").write_text("platform: onnx\nmax_batch_size: 8\n")
    with pytest.raises(ProtectConfigError, match="is a model of the repository"):
        protect(
            parse_protect_config(protect_raw(upstream(mlaas.url))),
            repository=repo,
            run_dir=tmp_path / "run",
        )
    assert mlaas.rows_answered == 0
