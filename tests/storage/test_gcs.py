"""GCS backend specifics: error translation, the emulator's missing create-if-absent, lazy
import, missing bucket, listing checks. The contract itself is in test_suite.py."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc

from walship.config import Config
from walship.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
)
from walship.storage import open_storage
from walship.storage.gcs import GcsStorage, translate


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (gexc.NotFound("gone"), ObjectNotFound),
        (gexc.Forbidden("no"), AccessDenied),
        (gexc.Unauthorized("who"), AccessDenied),
        (gexc.TooManyRequests("slow"), TransientStorageError),
        (gexc.ServiceUnavailable("503"), TransientStorageError),
        (gexc.InternalServerError("500"), TransientStorageError),
        (gexc.BadGateway("502"), TransientStorageError),
        (gexc.GatewayTimeout("504"), TransientStorageError),
        (requests.ConnectionError("reset"), TransientStorageError),
        (requests.Timeout("slow"), TransientStorageError),
        (gexc.BadRequest("bad"), StorageError),
    ],
)
def test_translate(exc: BaseException, expected: type[Exception]) -> None:
    error = translate(exc, "get gs://b/p/k")
    assert type(error) is expected
    assert "gs://b/p/k" in error.message


def test_translate_passes_bugs_through() -> None:
    with pytest.raises(ZeroDivisionError):
        translate(ZeroDivisionError(), "x")


def test_access_denied_has_a_hint_and_no_token() -> None:
    error = translate(gexc.Forbidden("caller does not have storage.objects.get"), "get x")
    assert error.hint and "GOOGLE_APPLICATION_CREDENTIALS" in error.hint
    assert "Bearer" not in error.message


def test_emulator_really_ignores_generation_match(gcs_store_url: str) -> None:
    """Why the backend reports create_if_absent=False under STORAGE_EMULATOR_HOST."""
    with open_storage(gcs_store_url, Config()) as store:
        backend = store.inner  # type: ignore[attr-defined]
        assert isinstance(backend, GcsStorage)
        assert backend.emulator and not store.capabilities.create_if_absent
        blob = backend.bucket.blob(backend.prefix + "raw")
        blob.upload_from_file(io.BytesIO(b"one"), if_generation_match=0)
        blob.upload_from_file(io.BytesIO(b"two"), if_generation_match=0)  # no 412
        assert blob.download_as_bytes() == b"two"
        # The backend's look-first still refuses, for a sequential second create.
        with pytest.raises(AlreadyExists):
            store.put("raw", io.BytesIO(b"three"), if_absent=True)  # type: ignore[arg-type]


def test_precondition_failed_is_already_exists(gcs_store_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On real GCS a 412 answers if_generation_match=0: it becomes AlreadyExists."""
    with open_storage(gcs_store_url, Config()) as store:
        backend: Any = store.inner  # type: ignore[attr-defined]
        backend.capabilities = type(backend.capabilities)(create_if_absent=True)

        def refuse(*args: object, **kwargs: object) -> None:
            assert kwargs["if_generation_match"] == 0
            raise gexc.PreconditionFailed("conditionNotMet")

        from google.cloud.storage import Blob

        monkeypatch.setattr(Blob, "upload_from_file", refuse)
        with pytest.raises(AlreadyExists):
            store.put("k", io.BytesIO(b"x"), if_absent=True)  # type: ignore[arg-type]


def test_missing_bucket_is_not_a_missing_object(gcs_store_url: str) -> None:
    with open_storage("gs://walship-missing-bucket/p", Config(retry_budget=0)) as store:
        for call in (lambda: store.stat("wal/x"), lambda: store.get("wal/x"),
                     lambda: list(store.list("wal/")),
                     lambda: store.put("k", io.BytesIO(b"x"))):  # type: ignore[arg-type]
            with pytest.raises(StorageError, match="bucket walship-missing-bucket does not exist"
                               ) as info:
                call()
            assert not isinstance(info.value, ObjectNotFound)


def test_listing_outside_the_prefix_is_refused(gcs_store_url: str) -> None:
    with open_storage(gcs_store_url, Config()) as store:
        backend: Any = store.inner  # type: ignore[attr-defined]

        class Fake:
            name = "elsewhere/x"
            size = 1
            updated = None

        backend.client.list_blobs = lambda *a, **k: iter([Fake()])
        with pytest.raises(IntegrityError, match=r"outside|does not start"):
            list(backend.list(""))


def test_delete_batches(gcs_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import walship.storage.gcs as gcs

    monkeypatch.setattr(gcs, "DELETE_BATCH", 3)
    with open_storage(gcs_store_url, Config()) as store:
        for i in range(7):
            store.put(f"d/{i}", io.BytesIO(b"x"))  # type: ignore[arg-type]
        assert store.delete_many([f"d/{i}" for i in range(7)] + ["d/absent"]) == 8
        assert list(store.list("d/")) == []


def test_import_is_lazy() -> None:
    code = ("import sys, walship.storage, walship.config; "
            "assert 'google.cloud.storage' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
