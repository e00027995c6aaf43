"""One frozen Config, built from command-line options > WALSHIP_* environment > TOML > defaults.

This is the only module that reads the environment (cloud SDKs read their own credentials).
Everything below it receives a Config. Key *material* never lives here, only key file paths;
the DSN may carry a password, so it is hidden from repr.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walship.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Config:
    """Every setting walship has. Field names are the TOML keys; WALSHIP_<NAME> the variables."""

    store: str | None = None
    compression: str = "lz4"
    key_file: Path | None = None
    public_key_file: Path | None = None
    # Several private keys may be given (os.pathsep-separated in the environment, a list in
    # TOML) so that objects written under an older key stay readable after a rotation.
    private_key_files: tuple[Path, ...] = ()
    # Seconds that one storage operation may spend retrying transient errors before giving up.
    retry_budget: float = 60.0
    # Parallel transfers (uploads of push-ahead segments or partitions, downloads).
    concurrency: int = 4
    # How many other .ready segments one wal-push call may push ahead.
    push_ahead: int = 16
    # How many segments wal-fetch downloads ahead in its background prefetcher (0 turns it off).
    prefetch: int = 8
    # walship's own working directory for push-ahead markers and prefetched segments.
    # None means <pg_wal>/walship, next to the WAL it describes.
    spool_dir: Path | None = None
    partition_size: int = 1 * GiB
    fast_checkpoint: bool = True
    # Seconds backup-push waits for the WAL its backup needs to be in the store.
    archive_timeout: float = 600.0
    dsn: str | None = field(default=None, repr=False)
    s3_multipart_threshold: int = 64 * MiB
    s3_part_size: int = 5 * MiB
    s3_sse: str | None = None
    s3_sse_kms_key_id: str | None = None
    s3_storage_class: str | None = None
    # Whether the S3 store enforces If-None-Match on puts (AWS, current MinIO and Ceph do).
    # false: walship looks before each create and relies on the stored digest.
    s3_conditional_writes: bool = True
    # "auto" (boto3's choice), "path" (MinIO, Ceph RGW without wildcard DNS) or "virtual".
    s3_addressing_style: str = "auto"
    # Seconds one socket read from the S3 endpoint may wait: a stalled response is given up
    # after this and retried (within retry_budget) instead of hanging the operation.
    s3_read_timeout: float = 60.0
    tls_verify: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise UsageError(
                f"unknown compression {self.compression!r}",
                hint=f"choose one of {', '.join(COMPRESSIONS)}",
            )
        if self.key_file is not None and self.public_key_file is not None:
            raise UsageError(
                "both a secret key file and a public key file are configured",
                hint="use WALSHIP_KEY_FILE for symmetric encryption or "
                "WALSHIP_PUBLIC_KEY_FILE/WALSHIP_PRIVATE_KEY_FILE for public-key encryption",
            )
        for name in ("concurrency",):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        for name in ("push_ahead", "prefetch"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative")
        if not 0 <= self.retry_budget < float("inf"):
            raise UsageError("retry_budget must be a number of seconds, 0 or more")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise UsageError(f"unknown s3_addressing_style {self.s3_addressing_style!r}",
                             hint="choose auto, path or virtual")
        for name in ("archive_timeout", "s3_read_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise UsageError(f"{name} must be a number of seconds above 0")
        if self.log_level not in LOG_LEVELS:
            raise UsageError(f"unknown log_level {self.log_level!r}",
                             hint=f"choose one of {', '.join(LOG_LEVELS)}")
        if self.s3_part_size < 5 * MiB:
            raise UsageError("s3_part_size must be at least 5MiB (the S3 minimum part size)")
        if self.partition_size < 1 * MiB:
            raise UsageError("partition_size must be at least 1MiB")

    def require_store(self) -> str:
        """The store URL, or a usage error that says how to set one."""
        if not self.store:
            raise UsageError(
                "no store configured",
                hint="set WALSHIP_STORE (file:///path, s3://bucket/prefix or gs://bucket/prefix)"
                " or 'store' in the config file",
            )
        return self.store

    def to_environ(self) -> dict[str, str]:
        """WALSHIP_* variables that rebuild this Config in a child process (non-defaults only)."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or (f.name == "private_key_files" and not value):
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = os.pathsep.join(str(v) for v in value)
            else:
                text = str(value)
            env[_ENV_NAMES[f.name]] = text
        return env

    @property
    def encrypted(self) -> bool:
        """Whether pushes encrypt (a secret or a public key is configured)."""
        return self.key_file is not None or self.public_key_file is not None


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """'64MiB', '1GiB', '1048576' -> bytes. Binary units whatever the spelling (1MB = 1MiB)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 64MiB, 1GiB)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_bool(text: str) -> bool:
    """The usual spellings of true and false."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _paths(value: Any) -> tuple[Path, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(Path(str(v)) for v in value)
    return tuple(Path(p) for p in str(value).split(os.pathsep) if p)


def _optional_path(value: Any) -> Path | None:
    return Path(str(value)) if value not in (None, "") else None


def _optional_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return parse_size(str(value))


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else parse_bool(str(value))


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    return int(value)


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "store": _optional_str,
    "compression": lambda v: str(v).lower(),
    "key_file": _optional_path,
    "public_key_file": _optional_path,
    "private_key_files": _paths,
    "retry_budget": float,
    "concurrency": _int,
    "push_ahead": _int,
    "prefetch": _int,
    "spool_dir": _optional_path,
    "partition_size": _size,
    "fast_checkpoint": _bool,
    "archive_timeout": float,
    "dsn": _optional_str,
    "s3_multipart_threshold": _size,
    "s3_part_size": _size,
    "s3_sse": _optional_str,
    "s3_sse_kms_key_id": _optional_str,
    "s3_storage_class": _optional_str,
    "s3_conditional_writes": _bool,
    "s3_addressing_style": lambda v: str(v).lower(),
    "s3_read_timeout": float,
    "tls_verify": _bool,
    "log_level": lambda v: str(v).lower(),
}

# The environment spells the private key list in the singular, as DESIGN.md names it.
_ENV_NAMES = {name: f"WALSHIP_{name.upper()}" for name in _CONVERTERS}
_ENV_NAMES["private_key_files"] = "WALSHIP_PRIVATE_KEY_FILE"

assert set(_CONVERTERS) == {f.name for f in dataclasses.fields(Config)}


def _convert(name: str, value: Any, source: str) -> Any:
    try:
        return _CONVERTERS[name](value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad value for {name} in {source}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _CONVERTERS:
            raise UsageError(
                f"unknown setting {raw_key!r} in config file {path}",
                hint=f"known settings: {', '.join(sorted(_CONVERTERS))}",
            )
        settings[key] = _convert(key, value, f"config file {path}")
    return settings


def load(
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
) -> Config:
    """Build the Config. `options` are command-line values (None means not given)."""
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    path = config_path if config_path is not None else env.get("WALSHIP_CONFIG")
    if path:
        settings.update(_read_toml(Path(path)))
    for name, var in _ENV_NAMES.items():
        if var in env:
            settings[name] = _convert(name, env[var], f"environment variable {var}")
    for name, value in (options or {}).items():
        if value is None:
            continue
        if name not in _CONVERTERS:
            raise UsageError(f"unknown option {name!r}")
        settings[name] = _convert(name, value, f"option --{name.replace('_', '-')}")
    return Config(**settings)
