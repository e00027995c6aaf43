"""Storage backends, chosen by URL scheme, imported lazily so that cloud SDKs load only when used.

`open_storage(url, config)` is the one way services get a store. It picks the backend module
from the scheme registry below, imports it only then (so `import walship.storage` never pulls
in boto3 or google-cloud-storage), and wraps the backend in the one retry wrapper
(walship.storage.retrying) with `config.retry_budget`.

A backend module provides `open_<name>(url: str, config: Config) -> Storage` and parses its
own URL; `parse_bucket_url` and `relative_key` are the shared helpers for bucket stores.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from walship.errors import IntegrityError, UsageError
from walship.storage.base import (
    Capabilities,
    ObjectInfo,
    Storage,
    check_key,
    check_metadata,
)

if TYPE_CHECKING:
    from walship.config import Config

__all__ = [
    "SCHEMES",
    "Capabilities",
    "ObjectInfo",
    "Storage",
    "check_key",
    "check_metadata",
    "open_storage",
    "parse_bucket_url",
    "redact_url",
    "relative_key",
]

Opener = Callable[[str, "Config"], Storage]


@dataclass(frozen=True)
class _Backend:
    module: str
    opener: str
    # The optional-dependency extra that provides the SDK, for the "install" hint.
    extra: str | None = None
    # Top-level package names whose absence means "the extra is not installed".
    sdk_packages: tuple[str, ...] = ()


# The registry. Adding a backend is one line here plus its module.
SCHEMES: dict[str, _Backend] = {
    "file": _Backend("walship.storage.local", "open_local"),
    "s3": _Backend("walship.storage.s3", "open_s3", "s3", ("boto3", "botocore")),
    "gs": _Backend("walship.storage.gcs", "open_gcs", "gcs", ("google",)),
    "memory": _Backend("walship.storage.memory", "open_memory"),
}

_URL_HINT = "use file:///absolute/path, s3://bucket/prefix or gs://bucket/prefix"
# S3 and GCS bucket names: lowercase letters, digits, dots, hyphens and (GCS) underscores.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def redact_url(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def open_storage(url: str, config: Config) -> Storage:
    """The store at `url`, wrapped in the retry wrapper with `config.retry_budget`.

    Raises UsageError (one line and a hint) for an unknown scheme, a malformed URL, or a
    backend whose SDK is not installed.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise UsageError(f"malformed store URL {redact_url(url)!r}", hint=_URL_HINT)
    backend = SCHEMES.get(scheme.lower())
    if backend is None:
        raise UsageError(
            f"unknown store scheme {scheme!r} in {redact_url(url)!r}",
            hint=f"known schemes: {', '.join(sorted(SCHEMES))}; {_URL_HINT}",
        )
    opener = _load_opener(scheme.lower(), backend)
    inner = opener(url, config)
    # Imported here, not at the top: tenacity is only needed once a store is actually opened.
    from walship.storage.retrying import RetryingStorage, RetryPolicy

    return RetryingStorage(inner, RetryPolicy(config.retry_budget))


def _load_opener(scheme: str, backend: _Backend) -> Opener:
    try:
        module = importlib.import_module(backend.module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if backend.extra and missing in backend.sdk_packages:
            raise UsageError(
                f"{scheme}:// stores need the {missing} package, which is not installed",
                hint=f"install walship[{backend.extra}] (pip install 'walship[{backend.extra}]')",
            ) from None
        if exc.name == backend.module:
            raise UsageError(
                f"{scheme}:// stores are not supported by this build of walship",
                hint=f"install walship[{backend.extra}]" if backend.extra else None,
            ) from None
        raise
    return cast(Opener, getattr(module, backend.opener))


def parse_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """Split `scheme://bucket/some/prefix` into ("bucket", "some/prefix/").

    The prefix comes back normalised: no leading slash, one trailing slash, or "" for the
    bucket's root. Raises UsageError for a missing or invalid bucket name or prefix.
    """
    parts = urlsplit(url)
    url = redact_url(url)
    if parts.scheme.lower() != scheme:
        raise UsageError(f"not a {scheme}:// URL: {url!r}", hint=_URL_HINT)
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise UsageError(
            f"malformed store URL {url!r}: unexpected credentials, port, query or fragment",
            hint=f"use {scheme}://bucket/prefix; endpoints and credentials come from the "
            "SDK's own settings",
        )
    bucket = parts.netloc
    if not bucket:
        raise UsageError(
            f"no bucket name in store URL {url!r}", hint=f"use {scheme}://bucket/prefix"
        )
    if not _BUCKET_RE.match(bucket):
        raise UsageError(
            f"invalid bucket name {bucket!r} in store URL {url!r}",
            hint="bucket names are 3-222 lowercase letters, digits, dots, hyphens, underscores",
        )
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise UsageError(
                f"invalid prefix {prefix!r} in store URL {url!r}",
                hint="use '/'-separated letters, digits, '.', '_' and '-'; no '.' or '..' parts",
            ) from None
        prefix += "/"
    return bucket, prefix


def relative_key(full_key: str, prefix: str, where: str) -> str:
    """The key of a listed object relative to the store's `prefix`, or IntegrityError.

    A listing that names an object outside our prefix, or a name that is not a valid key
    (e.g. with '..' parts), means a hostile or broken store: refuse rather than let a
    service act on it.
    """
    if not full_key.startswith(prefix):
        raise IntegrityError(
            f"listing of {where} returned {full_key!r}, which is outside the prefix {prefix!r}",
            hint="the store or a proxy in front of it is misbehaving; do not trust this listing",
        )
    key = full_key[len(prefix) :]
    try:
        return check_key(key)
    except ValueError:
        raise IntegrityError(
            f"listing of {where} returned an invalid key {key!r}",
            hint="something other than walship wrote under this prefix; move it elsewhere",
        ) from None
