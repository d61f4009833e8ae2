"""TCMU_OBD_E2E_TIMEOUT, the e2e host test's time limit: good values are
taken, bad ones are refused with the variable and the value in the message.
Not the e2e suite itself (tests/test_e2e_guest.py, marker e2e)."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("e2e_host", Path(__file__).with_name("test_e2e_guest.py"))
e2e_host = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e_host)


def test_timeout_default_and_value(monkeypatch):
    monkeypatch.delenv("TCMU_OBD_E2E_TIMEOUT", raising=False)
    assert e2e_host.timeout_from_env() == 2700.0
    monkeypatch.setenv("TCMU_OBD_E2E_TIMEOUT", "90.5")
    assert e2e_host.timeout_from_env() == 90.5


@pytest.mark.parametrize("bad", ["", "abc", "0", "-5", "nan", "inf", "1e999"])
def test_timeout_bad_values_name_the_variable(monkeypatch, bad):
    monkeypatch.setenv("TCMU_OBD_E2E_TIMEOUT", bad)
    with pytest.raises(ValueError, match=f"TCMU_OBD_E2E_TIMEOUT={bad!r}"):
        e2e_host.timeout_from_env()
