"""glibc malloc thresholds for CPU runs: applied where glibc is, left alone when the user set them."""

import ctypes
import sys

import pytest

from mimkit.train.cpu_memory import USER_SETTINGS, keep_freed_memory


def _has_glibc_mallopt() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _has_glibc_mallopt(), reason="needs glibc's mallopt")
def test_thresholds_are_applied_on_glibc(monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_user_malloc_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert keep_freed_memory() is False
