"""The exit-code registry in walship.errors, and its published table in docs/exit-codes.md."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from walship import errors
from walship.errors import (
    ALL_ERRORS,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    WAL_FETCH_ABORT_BASE,
    StorageUnavailable,
    TransientStorageError,
    WalshipError,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|")


def documented_codes() -> set[int]:
    """Every code in the first column of a table in docs/exit-codes.md."""
    codes = set()
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            codes.add(int(match.group(1)))
    return codes


def error_classes() -> list[type[WalshipError]]:
    """Every WalshipError subclass defined in walship.errors."""
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, WalshipError) and obj.__module__ == errors.__name__
    ]


def test_all_errors_lists_every_class() -> None:
    assert set(error_classes()) == set(ALL_ERRORS) | {TransientStorageError}
    assert TransientStorageError not in ALL_ERRORS
    assert len(set(ALL_ERRORS)) == len(ALL_ERRORS)


def test_codes_are_distinct() -> None:
    codes = [cls.exit_code for cls in ALL_ERRORS]
    duplicates = {c for c in codes if codes.count(c) > 1}
    assert not duplicates, f"shared exit codes: {duplicates}"


def test_transient_shares_storage_unavailable_code() -> None:
    assert issubclass(TransientStorageError, StorageUnavailable)
    assert TransientStorageError.exit_code == StorageUnavailable.exit_code


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_code_ranges(cls: type[WalshipError]) -> None:
    assert 2 <= cls.exit_code <= 125
    assert 126 <= WAL_FETCH_ABORT_BASE + cls.exit_code <= 255
    # Never 1: that means "the store confirmed the object does not exist" to PostgreSQL.
    assert cls.exit_code != EXIT_NOT_FOUND


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_class_carries_message_hint_label(cls: type[WalshipError]) -> None:
    exc = cls("something failed", hint="do this")
    assert exc.message == "something failed"
    assert exc.hint == "do this"
    assert str(exc) == "something failed"
    assert isinstance(cls.label, str) and cls.label == cls.label.lower()
    assert cls("x").hint is None


def test_fixed_codes() -> None:
    assert (EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE) == (0, 1, 2)
    assert errors.UsageError.exit_code == EXIT_USAGE
    assert (EXIT_SIGINT, EXIT_SIGTERM) == (130, 143)
    # wal-fetch's abort codes stay clear of the signal codes and of the shell's 126/127.
    abort_codes = {WAL_FETCH_ABORT_BASE + cls.exit_code for cls in ALL_ERRORS}
    assert not abort_codes & {126, 127, EXIT_SIGINT, EXIT_SIGTERM}


def test_doc_table_parses() -> None:
    codes = documented_codes()
    assert {EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE} <= codes


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_code_is_documented(cls: type[WalshipError]) -> None:
    codes = documented_codes()
    assert cls.exit_code in codes, f"{cls.__name__} ({cls.exit_code}) missing from {DOC}"
    fetch_code = WAL_FETCH_ABORT_BASE + cls.exit_code
    assert fetch_code in codes, f"wal-fetch code {fetch_code} missing from {DOC}"


def test_signal_and_internal_codes_are_documented() -> None:
    codes = documented_codes()
    assert {EXIT_SIGINT, EXIT_SIGTERM, 3, WAL_FETCH_ABORT_BASE + 3} <= codes


def test_doc_names_every_class() -> None:
    text = DOC.read_text()
    for cls in [*ALL_ERRORS, TransientStorageError]:
        assert f"`{cls.__name__}`" in text, f"{cls.__name__} not named in {DOC}"


def test_doc_has_no_undefined_codes() -> None:
    known = {EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM}
    known |= {cls.exit_code for cls in ALL_ERRORS}
    known |= {WAL_FETCH_ABORT_BASE + cls.exit_code for cls in ALL_ERRORS}
    assert documented_codes() <= known
