"""Uncaught exceptions reach the log; a child that died while multiprocessing handed it a file is one line."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

import pytest

from garden.host.logs import _log_uncaught


def _raised_in(filename: str, error: BaseException) -> tuple[type[BaseException], BaseException, TracebackType]:
    """``error`` as raised by code in ``filename`` (its frame in the traceback names that file)."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except BaseException:
        kind, value, tb = sys.exc_info()
        assert kind is not None and value is not None and tb is not None
        return kind, value, tb
    raise AssertionError("not raised")


def test_a_child_gone_mid_handover_is_one_warning_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="garden"):
        _log_uncaught(*_raised_in("/usr/lib/python3.11/multiprocessing/resource_sharer.py", ConnectionResetError(104)))
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "went away" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("filename", "error"),
    [("/srv/garden/somewhere.py", ConnectionResetError(104)),  # the same error elsewhere is a bug to show
     ("/usr/lib/python3.11/multiprocessing/resource_sharer.py", ValueError("not a lost child"))],
)  # fmt: skip
def test_any_other_uncaught_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture, filename: str, error: Exception
) -> None:
    with caplog.at_level(logging.INFO, logger="garden"):
        _log_uncaught(*_raised_in(filename, error))
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL and record.exc_info is not None
    assert "Traceback" in caplog.text and filename in caplog.text
