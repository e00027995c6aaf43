"""walship.ops.check.check against real stores: file, s3 (moto server), gcs (emulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from walship import layout
from walship.config import Config
from walship.errors import StorageError, UsageError
from walship.ops.check import CheckReport, check
from walship.storage import open_storage

REQUIRED = ["write", "read", "metadata", "list", "delete"]


def _assert_clean(report: CheckReport, url: str) -> None:
    with open_storage(url, Config(store=url)) as store:
        assert list(store.list(layout.CHECK_PREFIX)) == []  # the probe was removed


def _names(report: CheckReport) -> list[str]:
    return [line.name for line in report.lines]


def _common(report: CheckReport) -> None:
    assert report.ok, report.render()
    assert _names(report) == [*REQUIRED[:4], "create-if-absent", "delete", "bulk-delete",
                              "consistent-list"]
    for name in REQUIRED:
        assert report.line(name).status == "ok", report.render()
        assert report.line(name).required
    report.raise_for_missing()
    data = json.loads(report.to_json())
    assert data["ok"] is True
    assert [c["name"] for c in data["checks"]] == _names(report)
    assert {c["status"] for c in data["checks"]} <= {"ok", "missing"}
    assert "ok" in report.render()


def test_check_file_store(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    url = f"file://{tmp_path}/store"
    report = check(Config(store=url))
    _common(report)
    assert report.line("create-if-absent").status == "ok"
    _assert_clean(report, url)


@pytest.mark.s3
def test_check_s3_store(s3_store_url: str) -> None:
    report = check(Config(store=s3_store_url))
    _common(report)
    assert report.line("create-if-absent").status == "ok"  # moto enforces If-None-Match
    _assert_clean(report, s3_store_url)


def test_check_gcs_emulator(gcs_store_url: str) -> None:
    report = check(Config(store=gcs_store_url))
    _common(report)
    line = report.line("create-if-absent")
    # The emulator ignores if_generation_match=0: reported missing (optional), with a hint.
    assert line.status == "missing" and not line.required
    assert line.hint and "SHA-256" in line.hint
    assert "does not enforce" in line.detail
    _assert_clean(report, gcs_store_url)


def test_check_reports_missing_permissions(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o500)  # readable, not writable
    try:
        url = f"file://{store}"
        report = check(Config(store=url, retry_budget=0))
    finally:
        store.chmod(0o700)
    import os

    if os.geteuid() == 0:
        # root writes anyway: then everything is present
        assert report.ok
        return
    assert not report.ok
    assert report.line("write").status == "missing"
    assert report.line("read").detail.startswith("not tested")
    assert report.line("write").hint
    with pytest.raises(StorageError, match="lacks what walship needs: write"):
        report.raise_for_missing()
    assert json.loads(report.to_json())["ok"] is False


def test_check_missing_gcs_bucket(gcs_store_url: str) -> None:
    url = "gs://walship-no-such-bucket/p"
    report = check(Config(store=url, retry_budget=0))
    assert not report.ok
    assert "does not exist" in report.line("write").detail
    with pytest.raises(StorageError):
        report.raise_for_missing()


def test_check_without_store() -> None:
    with pytest.raises(UsageError):
        check(Config())
