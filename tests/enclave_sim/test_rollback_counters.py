"""One rollback counter per model: each model's enclave restarts from its own sealed file
whatever was sealed since, and an older sealed version of the same model is still refused.

With one platform-wide counter, sealing model B after model A (counter 2) refused A's restart
from its own sealed file (version 1) with RollbackRejected, and after ten tries A was down."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enclave_sim.pki import init_ca
from enclave_sim.sealing import COUNTER_FILE, COUNTER_LOCK, read_counter, seal, unseal
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import RollbackRejected
from tests.model_factory import tiny_classifier


@pytest.fixture
def platform(tmp_path: Path) -> Path:
    init_ca(tmp_path / "platform")
    return tmp_path / "platform"


@pytest.fixture
def model(tmp_path: Path) -> bytes:
    tiny_classifier(tmp_path / "v.onnx")
    return (tmp_path / "v.onnx").read_bytes()


A = EnclaveModelConfig(max_batch_size=64)
B = EnclaveModelConfig(max_batch_size=32)


def test_two_models_sealed_one_after_the_other_both_restart(platform: Path, model: bytes) -> None:
    sealed_a, _, version_a = seal(model, A, platform, model_id="digits")
    unseal(sealed_a, platform)  # model A's enclave boots
    sealed_b, _, version_b = seal(model, B, platform, model_id="fashion_mnist")
    unseal(sealed_b, platform)  # then model B's
    # each restarts from its own sealed file, as the supervisor does, in either order
    assert unseal(sealed_a, platform).version == version_a
    assert unseal(sealed_b, platform).version == version_b
    assert unseal(sealed_a, platform).version == version_a
    assert read_counter(platform, "digits") == version_a
    assert read_counter(platform, "fashion_mnist") == version_b


def test_an_older_sealed_version_of_the_same_model_is_refused(
    platform: Path, model: bytes, tmp_path: Path
) -> None:
    old, _, v1 = seal(model, A, platform, model_id="digits")
    unseal(old, platform)
    tiny_classifier(tmp_path / "v2.onnx", scale=2.0)  # a new verifier: another pcr2
    new, _, v2 = seal((tmp_path / "v2.onnx").read_bytes(), A, platform, model_id="digits")
    assert v2 == v1 + 1
    unseal(new, platform)
    with pytest.raises(RollbackRejected, match=r"older than model 'digits'"):
        unseal(old, platform)
    # another model's sealing does not lower or reset it
    other, _, _ = seal(model, B, platform, model_id="other")
    unseal(other, platform)
    with pytest.raises(RollbackRejected):
        unseal(old, platform)
    assert unseal(new, platform).version == v2  # a reboot of the current version is fine


def test_an_existing_platform_counter_seeds_each_model(platform: Path, model: bytes) -> None:
    """Migration: a platform from before per-model counters (one ``model_counter``) keeps its
    protection: a model without a counter of its own starts from it, and a file sealed
    without an identity stays refused once its model booted a newer version."""
    legacy, _, v_legacy = seal(model, A, platform)  # no identity: the platform-wide counter
    unseal(legacy, platform)
    (platform / COUNTER_FILE).write_text("5\n")  # other models booted since
    assert read_counter(platform, "digits") == 5
    named, _, version = seal(model, A, platform, model_id="digits")
    assert version == 6
    unseal(named, platform)
    assert read_counter(platform, "digits") == 6
    assert read_counter(platform) == 6  # the platform-wide counter is the highest booted
    with pytest.raises(RollbackRejected, match="older than the platform counter 6"):
        unseal(legacy, platform)
    assert v_legacy == 1


def test_a_counter_of_its_own_is_kept_at_the_seeded_version(platform: Path, model: bytes) -> None:
    """A model booted at exactly the platform-wide value gets its own counter, so that
    later boots of other models raising the platform-wide one do not refuse it."""
    (platform / COUNTER_FILE).write_text("3\n")
    sealed, _, _ = seal(model, A, platform, model_id="digits", version=3)
    unseal(sealed, platform)
    other, _, _ = seal(model, B, platform, model_id="other")
    unseal(other, platform)
    assert read_counter(platform) == 4
    assert unseal(sealed, platform).version == 3


def test_any_model_name_gets_a_counter_inside_the_platform(platform: Path, model: bytes) -> None:
    for name in ("../../etc/passwd", "a/b", "ünïcode", "x" * 300):
        sealed, _, _ = seal(model, A, platform, model_id=name)
        unseal(sealed, platform)
        assert read_counter(platform, name) >= 1
    outside = [p for p in platform.parent.rglob("*") if platform not in p.parents and p != platform]
    assert all(p.name in {"v.onnx", "platform"} for p in outside)


def test_a_boot_waits_for_the_counters_held_by_another_process(
    platform: Path, model: bytes
) -> None:
    """Enclaves of several models boot at once, each reading then raising the platform-wide
    counter: unguarded, a boot could write the lower version last and the counter go down.
    Every read-check-write holds the platform's counter lock: a boot waits while another
    process holds it (it went ahead at once), then raises the counter."""
    sealed, _, version = seal(model, A, platform, version=7)
    script = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(platform / COUNTER_LOCK)!r}, os.O_RDONLY | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with subprocess.Popen([sys.executable, "-c", script], **pipes) as holder:  # type: ignore[call-overload]
        try:
            assert holder.stdout.readline().strip() == "held"
            booted: list[int] = []
            boot = threading.Thread(target=lambda: booted.append(unseal(sealed, platform).version))
            boot.start()
            boot.join(0.5)
            assert boot.is_alive(), "the boot did not wait for the counters' lock"
            assert read_counter(platform) < version
            holder.stdin.write("\n")
            holder.stdin.flush()
            boot.join(30)
            assert booted == [version]
            assert read_counter(platform) == version
        finally:
            holder.kill()


def test_boots_at_once_leave_the_highest_version_in_the_counter(
    platform: Path, model: bytes
) -> None:
    files = [seal(model, A, platform, version=v)[0] for v in range(1, 9)]

    def boot(sealed: bytes) -> None:
        for _ in range(5):
            with contextlib.suppress(RollbackRejected):  # a lower one after a higher: refused
                unseal(sealed, platform)

    workers = [threading.Thread(target=boot, args=(f,)) for f in files[::-1]]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert read_counter(platform) == 8
