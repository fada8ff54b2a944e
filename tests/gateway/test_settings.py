from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, is_loopback


def test_env_prefix_and_comma_separated_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIDES_API_KEYS", "a, b,,c")
    monkeypatch.setenv("FIDES_ADMIN_API_KEYS", "root")
    monkeypatch.setenv("FIDES_PORT", "9001")
    s = Settings()
    assert s.api_keys == ["a", "b", "c"]
    assert s.admin_api_keys == ["root"]
    assert s.port == 9001


def test_key_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nk1\n\n k2 \n")
    monkeypatch.setenv("FIDES_API_KEY_FILE", str(f))
    assert Settings().api_keys == ["k1", "k2"]


def test_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read key file"):
        Settings(api_key_file=tmp_path / "absent")


def test_no_keys_refused_outside_dev_mode() -> None:
    with pytest.raises(ValueError, match="no API keys configured"):
        Settings().check_secure()


def test_dev_mode_only_on_loopback() -> None:
    Settings(dev_mode=True).check_secure()
    with pytest.raises(ValueError, match="only binds to loopback"):
        Settings(dev_mode=True, host="0.0.0.0").check_secure()
    Settings(api_keys=["k"], host="0.0.0.0").check_secure()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_bad_port_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIDES_PORT", "70000")
    with pytest.raises(ValueError, match="port"):
        Settings()


def test_a_json_list_of_keys_is_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings' own list format: not comma text with brackets and quotes in the keys
    monkeypatch.setenv("FIDES_API_KEYS", '["key-one", "key-two"]')
    monkeypatch.setenv("FIDES_ADMIN_API_KEYS", '["root-key"]')
    s = Settings()
    assert s.api_keys == ["key-one", "key-two"]
    assert s.admin_api_keys == ["root-key"]


def test_broken_json_keys_are_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIDES_API_KEYS", '["secret-one", "secret-two"')
    with pytest.raises(ValueError, match="not a JSON list"):
        Settings()


def test_key_file_drops_a_byte_order_mark_and_indented_comments(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_bytes(b"\xef\xbb\xbfkey-one\r\n  # user keys  \r\nkey-two  \r\n")
    assert Settings(api_key_file=f).api_keys == ["key-one", "key-two"]


@pytest.mark.parametrize("field", ["api_key_file", "admin_api_key_file"])
def test_a_key_file_without_keys_is_an_error_naming_it(tmp_path: Path, field: str) -> None:
    # an empty mounted Secret must not turn the keys (or the admin keys) off silently
    f = tmp_path / "keys"
    f.write_text("# no keys yet\n\n")
    with pytest.raises(ValueError, match=f"FIDES_{field.upper()}: key file .* holds no key"):
        Settings(dev_mode=True, **{field: f})


def test_log_level_must_be_a_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIDES_LOG_LEVEL", "warn")
    assert Settings().log_level == "WARNING"
    monkeypatch.setenv("FIDES_LOG_LEVEL", "VERBOSE")
    with pytest.raises(ValueError, match="'VERBOSE' is not a log level"):
        Settings()


@pytest.mark.parametrize(
    "variable",
    [
        "FIDES_SHUTDOWN_GRACE_S",
        "FIDES_DEFAULT_TIMEOUT_S",
        "FIDES_HEADER_TIMEOUT_S",
        "FIDES_INTEGRITY_INCIDENTS_MAX_MB",
    ],
)
def test_infinite_numbers_are_rejected(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # int(inf) crashed the start-up (shutdown grace) or the integrity set-up (incidents)
    monkeypatch.setenv(variable, "inf")
    with pytest.raises(ValueError, match="finite number"):
        Settings()


@pytest.mark.parametrize(
    "variable",
    [
        "FIDES_MODEL_REPOSITORY",
        "FIDES_HOST",
        "FIDES_INTEGRITY_STATE_DIR",
        "FIDES_ENCLAVE_RUNTIME_DIR",
        "FIDES_API_KEY_FILE",
    ],
)
def test_an_empty_path_or_host_is_an_error(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # "" was the current directory (a repository, alarm state in the working directory) or
    # every interface
    monkeypatch.setenv(variable, "")
    with pytest.raises(ValueError, match="is empty"):
        Settings(api_keys=["k"])


def test_a_key_no_client_can_present_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "clé" was accepted and then never matched: clients send UTF-8 (or refuse), the server
    # reads headers as Latin-1
    monkeypatch.setenv("FIDES_API_KEYS", "good-key,clé-0123456789")
    with pytest.raises(ValueError, match="key 2 has a character that is not printable ASCII"):
        Settings()
    monkeypatch.delenv("FIDES_API_KEYS")
    f = tmp_path / "keys"
    f.write_text("good-key\nclé-0123456789\n", encoding="utf-8")
    with pytest.raises(ValueError, match="FIDES_ADMIN_API_KEY_FILE: key file .*: key 2 has"):
        Settings(admin_api_key_file=f)


def test_a_key_too_short_to_be_a_secret_is_named_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fides serve` checks it (create_app does not: tests pass short keys in-process)
    monkeypatch.setenv("FIDES_API_KEYS", "a-user-key-long-enough,pass123")
    keys = tmp_path / "admin"
    keys.write_text("short-one\nan-admin-key-long-enough\n")
    settings = Settings(admin_api_key_file=keys)
    with pytest.raises(ValueError, match="least 16") as caught:
        settings.check_key_lengths()
    assert str(caught.value).splitlines() == [
        "FIDES_API_KEYS: key 2 is 7 characters long; an API key needs at least 16 (make one "
        "with `openssl rand -hex 24`)",
        f"FIDES_ADMIN_API_KEY_FILE: key file {keys}: key 1 is 9 characters long; an API key "
        "needs at least 16 (make one with `openssl rand -hex 24`)",
    ]
    assert "pass123" not in str(caught.value)
    assert "short-one" not in str(caught.value)


def test_keys_of_sixteen_characters_or_more_pass() -> None:
    Settings(api_keys=["0123456789abcdef"], admin_api_keys=["x" * 64]).check_key_lengths()
    Settings(dev_mode=True).check_key_lengths()  # no keys at all: check_secure's business
