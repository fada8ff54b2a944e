"""``fides serve`` (``python -m gateway.cli serve``) refuses bad settings at once: one line per
problem naming the variable, exit status 2, no traceback; unknown FIDES_* variables (typos)
are named."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import USER_KEY
from tests.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def _serve(
    tmp_path: Path, env: dict[str, str], *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    base.update(
        {
            "FIDES_MODEL_REPOSITORY": str(tmp_path),
            "FIDES_GRPC_ENABLED": "false",
            "FIDES_API_KEYS": "a-user-key-of-some-length",
            "PYTHONPATH": str(REPO_ROOT),
            "COLUMNS": "80",
        }
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", *args],
        cwd=tmp_path,
        env=base,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"FIDES_PORT": "abc"}, (), "FIDES_PORT='abc': Input should be a valid integer"),
        ({}, ("--port", "70000"), "--port=70000: Input should be less than or equal to 65535"),
        ({"FIDES_LOG_LEVEL": "VERBOSE"}, (), "FIDES_LOG_LEVEL='VERBOSE': 'VERBOSE' is not a"),
        ({"FIDES_SHUTDOWN_GRACE_S": "inf"}, (), "FIDES_SHUTDOWN_GRACE_S='inf': Input should be"),
        ({"FIDES_MAX_BODY_BYTES": "-5"}, (), "FIDES_MAX_BODY_BYTES='-5': Input should be greater"),
        ({"FIDES_API_KEY_FILE": "/nonexistent/keys"}, (), "FIDES_API_KEY_FILE: cannot read key"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], expected: str
) -> None:
    result = _serve(tmp_path, env, *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: " + expected), result.stderr
    assert len(lines) == 1, result.stderr


def test_every_bad_setting_is_named_and_keys_are_not_echoed(tmp_path: Path) -> None:
    result = _serve(
        tmp_path, {"FIDES_PORT": "-1", "FIDES_DEV_MODE": "maybe", "FIDES_API_KEYS": '["sekrit"'}
    )
    assert result.returncode == 2, result.stderr
    assert "FIDES_PORT='-1'" in result.stderr
    assert "FIDES_DEV_MODE='maybe'" in result.stderr
    assert "FIDES_API_KEYS: " in result.stderr
    assert "sekrit" not in result.stderr


def test_an_unknown_fides_variable_is_named_with_the_setting_it_resembles(
    tmp_path: Path,
) -> None:
    # a typo (FIDES_MAX_BODY_BYTE) was ignored without a word: the default applied
    result = _serve(
        tmp_path,
        {"FIDES_MAX_BODY_BYTE": "1024", "FIDES_TORCH_SPEC": "torch", "FIDES_PORT": "x"},
    )
    assert result.returncode == 2, result.stderr
    assert "FIDES_MAX_BODY_BYTE (did you mean FIDES_MAX_BODY_BYTES?)" in result.stderr
    assert "FIDES_TORCH_SPEC" not in result.stderr  # read by scripts/install_torch.py


def test_a_repository_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.write_text("")
    result = _serve(tmp_path, {"FIDES_MODEL_REPOSITORY": str(repo)})
    assert result.returncode == 2, result.stderr
    assert f"model repository {repo} (FIDES_MODEL_REPOSITORY) is not a directory" in (result.stderr)


def test_a_taken_port_is_named_before_anything_loads(tmp_path: Path) -> None:
    # it was found after every model loaded and every enclave started, in uvicorn's words
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(tmp_path, {"FIDES_PORT": str(port), "FIDES_HOST": "127.0.0.1"})
    assert result.returncode == 2, result.stderr
    assert (
        f"error: cannot bind 127.0.0.1:{port} (FIDES_HOST, FIDES_PORT): Address already in use"
        in result.stderr
    )
    assert "application startup" not in result.stderr.lower()  # before the models


def test_a_taken_grpc_port_is_named_before_anything_loads(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"FIDES_GRPC_ENABLED": "true", "FIDES_GRPC_PORT": str(port), "FIDES_PORT": "0"}
        result = _serve(tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert f"cannot bind 127.0.0.1:{port} (FIDES_HOST, FIDES_GRPC_PORT)" in result.stderr
    assert "application startup" not in result.stderr.lower()


def test_one_port_for_http_and_grpc_is_refused(tmp_path: Path) -> None:
    env = {"FIDES_GRPC_ENABLED": "true", "FIDES_GRPC_PORT": "8123", "FIDES_PORT": "8123"}
    result = _serve(tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert "error: FIDES_GRPC_PORT and FIDES_PORT are both 8123" in result.stderr


def test_a_started_gateway_names_unknown_variables(tmp_path: Path) -> None:
    # a typo (FIDES_MAX_BODY_BYTE) was ignored without a word: the default applied
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    env.update(
        {
            "FIDES_MODEL_REPOSITORY": str(tmp_path),
            "FIDES_GRPC_ENABLED": "false",
            "FIDES_API_KEYS": "a-user-key-of-some-length",
            "FIDES_PORT": "0",
            "FIDES_LOG_JSON": "0",
            "FIDES_MAX_BODY_BYTE": "1024",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        assert match is not None, log_path.read_text()
        port = int(match.group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live").status_code == 200
        log = log_path.read_text()
        assert (
            "ignoring unknown FIDES_* variables: FIDES_MAX_BODY_BYTE "
            "(did you mean FIDES_MAX_BODY_BYTES?)" in log
        )
    finally:
        stop_process(process)
    # uvicorn re-raises the SIGTERM it handled once it has shut down
    assert process.returncode in (0, -signal.SIGTERM), log_path.read_text()


def test_the_other_programs_variables_are_not_called_unknown() -> None:
    # every FIDES_ variable docs/reference/settings.md lists is a setting or another program's
    from gateway.settings import unknown_variables

    page = (REPO_ROOT / "docs" / "reference" / "settings.md").read_text()
    listed = set(re.findall(r"`(FIDES_[A-Z0-9_]+)`", page))
    assert len(listed) > 30
    assert unknown_variables(dict.fromkeys(listed, "1")) == []


def test_a_fraction_of_a_second_of_shutdown_grace_is_not_cut_to_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn takes whole seconds of graceful shutdown: 0.5 s must not become 0 s (in-flight
    requests cut at once); it is rounded up."""
    import gateway.cli
    import gateway.logs

    for name in [k for k in os.environ if k.startswith("FIDES_")]:
        monkeypatch.delenv(name)
    for name, value in {
        "FIDES_MODEL_REPOSITORY": str(tmp_path),
        "FIDES_GRPC_ENABLED": "false",
        "FIDES_API_KEYS": "a-user-key-of-some-length",
        "FIDES_PORT": "0",
        "FIDES_SHUTDOWN_GRACE_S": "0.5",
    }.items():
        monkeypatch.setenv(name, value)
    ran: dict[str, object] = {}
    monkeypatch.setattr(gateway.cli, "_run", lambda app, **kw: ran.update(kw))
    monkeypatch.setattr(gateway.logs, "configure_logging", lambda *a: None)
    interval = sys.getswitchinterval()
    try:
        gateway.cli.serve()
    finally:
        sys.setswitchinterval(interval)
    assert ran["timeout_graceful_shutdown"] == 1


# -- refused before anything loads: each would have started (and served) as if all were well;
# FIDES_PORT=0 so that a gateway that does start takes no shared port


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # typer turned "" into Path("."): the working directory served as the repository
        (("--model-repository", ""), "error: --model-repository='': is empty"),
        (("--model-repository", " "), "error: --model-repository=' ': is empty"),
        (("--host", ""), "error: --host='': is empty"),
    ],
)
def test_an_empty_path_or_host_flag_is_refused_by_name(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    result = _serve(tmp_path, {"FIDES_PORT": "0"}, *args, timeout_s=30)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), result.stderr


def test_a_key_too_short_to_be_a_secret_is_refused_by_name(tmp_path: Path) -> None:
    key_file = tmp_path / "admin-keys"
    key_file.write_text("# admin keys\nadmin-key-long-enough-0001\ns3cr3t-x\n")
    env = {
        "FIDES_PORT": "0",
        "FIDES_API_KEYS": f"{USER_KEY},hunter2",
        "FIDES_ADMIN_API_KEY_FILE": str(key_file),
    }
    result = _serve(tmp_path, env, timeout_s=30)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: FIDES_API_KEYS: key 2 is 7 characters long; an API key needs at least 16 "
        "(make one with `openssl rand -hex 24`)",
        f"error: FIDES_ADMIN_API_KEY_FILE: key file {key_file}: key 2 is 8 characters long; "
        "an API key needs at least 16 (make one with `openssl rand -hex 24`)",
    ], result.stderr
    assert "hunter2" not in result.stderr
    assert "s3cr3t-x" not in result.stderr


@pytest.mark.parametrize("explicit", [True, False], ids=["state-dir", "runtime-dir"])
def test_an_unwritable_alarm_state_directory_is_refused_by_name(
    trained_repository: tuple[Path, dict[str, object]], tmp_path: Path, explicit: bool
) -> None:
    """A verified model's sequential alarm state that cannot be written was kept in memory
    only (lost at the next restart, latched alarms too) while the gateway said ready."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory under a file cannot be made, even by root
    if explicit:
        env = {"FIDES_INTEGRITY_STATE_DIR": str(blocker / "alarm")}
        named = f"{blocker / 'alarm'} (FIDES_INTEGRITY_STATE_DIR)"
    else:
        env = {"FIDES_ENCLAVE_RUNTIME_DIR": str(blocker / "enclave")}
        named = (
            f"{blocker / 'enclave' / 'alarm'} "
            "(FIDES_INTEGRITY_STATE_DIR, by default <FIDES_ENCLAVE_RUNTIME_DIR>/alarm)"
        )
    env.update({"FIDES_PORT": "0", "FIDES_MODEL_REPOSITORY": str(trained_repository[0])})
    result = _serve(tmp_path, env, timeout_s=30)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(
        f"error: integrity alarm state directory {named} is not writable: Not a directory; "
        "the sequential alarms of digits are kept there"
    ), result.stderr
    assert "application startup" not in result.stderr.lower()  # before the models


def test_a_repository_without_verified_models_needs_no_alarm_state_directory(
    tmp_path: Path,
) -> None:
    import gateway.cli
    from gateway.settings import Settings

    (tmp_path / "repo").mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = Settings(
        model_repository=tmp_path / "repo",
        api_keys=[USER_KEY],
        integrity_state_dir=blocker / "alarm",
    )
    gateway.cli._check_alarm_state_dir(settings)  # no verified model: nothing to keep
