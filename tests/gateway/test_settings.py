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
