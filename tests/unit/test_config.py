"""walship.config: precedence, validation, the environment round trip, size and bool parsing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from walship import config as config_mod
from walship.config import Config, load, parse_bool, parse_size
from walship.errors import UsageError

MiB = 1024 * 1024
GiB = 1024 * MiB


def write_toml(tmp_path: Path, text: str, name: str = "walship.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def usage_error(**kwargs: Any) -> UsageError:
    with pytest.raises(UsageError) as info:
        load(**kwargs)
    exc = info.value
    assert exc.exit_code == 2
    assert "\n" not in exc.message, "usage errors are said in one line"
    assert exc.hint is None or "\n" not in exc.hint
    return exc


# --- defaults and precedence ----------------------------------------------------------------


def test_defaults() -> None:
    cfg = load(environ={})
    assert cfg == Config()
    assert cfg.store is None
    assert cfg.compression == "lz4"
    assert cfg.private_key_files == ()
    assert not cfg.encrypted
    assert cfg.to_environ() == {}


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("WALSHIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("WALSHIP_STORE", "file:///srv/archive")
    assert load().store == "file:///srv/archive"


def test_precedence_options_env_toml_defaults(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        'store = "file:///from/toml"\ncompression = "zstd"\nconcurrency = 7\nprefetch = 3\n',
    )
    env = {
        "WALSHIP_CONFIG": str(toml),
        "WALSHIP_STORE": "file:///from/env",
        "WALSHIP_COMPRESSION": "gzip",
    }
    options = {"store": "file:///from/option", "compression": None, "concurrency": None}

    cfg = load(options, environ=env)
    assert cfg.store == "file:///from/option"  # option beats env and TOML
    assert cfg.compression == "gzip"  # env beats TOML (option None means not given)
    assert cfg.concurrency == 7  # TOML beats the default
    assert cfg.prefetch == 3
    assert cfg.push_ahead == Config().push_ahead  # the default

    assert load(environ=env).store == "file:///from/env"
    del env["WALSHIP_STORE"]
    assert load(environ=env).store == "file:///from/toml"
    del env["WALSHIP_CONFIG"]
    assert load(environ=env).store is None


def test_config_path_beats_walship_config(tmp_path: Path) -> None:
    a = write_toml(tmp_path, 'store = "file:///a"\n', "a.toml")
    b = write_toml(tmp_path, 'store = "file:///b"\n', "b.toml")
    assert load(environ={"WALSHIP_CONFIG": str(a)}).store == "file:///a"
    assert load(environ={"WALSHIP_CONFIG": str(a)}, config_path=b).store == "file:///b"


def test_options_are_converted() -> None:
    cfg = load({"partition_size": "2GiB", "fast_checkpoint": "no", "spool_dir": "/s"}, environ={})
    assert cfg.partition_size == 2 * GiB
    assert cfg.fast_checkpoint is False
    assert cfg.spool_dir == Path("/s")


def test_unknown_option() -> None:
    exc = usage_error(options={"stroe": "file:///x"}, environ={})
    assert "stroe" in exc.message


def test_toml_spellings(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        "fast-checkpoint = false\n"
        "partition_size = 1073741824\n"
        's3_part_size = "32MiB"\n'
        "tls_verify = false\n"
        "retry_budget = 5\n"
        'key_file = "/etc/walship/secret.key"\n'
        'log_level = "DEBUG"\n',
    )
    cfg = load(environ={}, config_path=toml)
    assert cfg.fast_checkpoint is False
    assert cfg.partition_size == GiB
    assert cfg.s3_part_size == 32 * MiB
    assert cfg.tls_verify is False
    assert cfg.retry_budget == 5.0
    assert cfg.key_file == Path("/etc/walship/secret.key")
    assert cfg.encrypted
    assert cfg.log_level == "debug"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'store = "file:///x"\ncompresion = "zstd"\n')
    exc = usage_error(environ={}, config_path=toml)
    assert "compresion" in exc.message
    assert str(toml) in exc.message


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, '[s3]\npart_size = "16MiB"\n')
    assert "s3" in usage_error(environ={}, config_path=toml).message


@pytest.mark.parametrize(
    "text", ['store = "file:///x\n', "store file:///x\n", "[[\n", "a = 1\na = 2\n", "\x00"]
)
def test_malformed_toml_is_one_line(tmp_path: Path, text: str) -> None:
    toml = write_toml(tmp_path, text)
    exc = usage_error(environ={}, config_path=toml)
    assert "not valid TOML" in exc.message
    assert str(toml) in exc.message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    exc = usage_error(environ={"WALSHIP_CONFIG": str(missing)})
    assert str(missing) in exc.message


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    usage_error(environ={}, config_path=tmp_path)


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("WALSHIP_PARTITION_SIZE", "12XB", "partition_size"),
        ("WALSHIP_S3_PART_SIZE", "1.5MiB", "s3_part_size"),
        ("WALSHIP_S3_MULTIPART_THRESHOLD", "-1", "s3_multipart_threshold"),
        ("WALSHIP_FAST_CHECKPOINT", "maybe", "fast_checkpoint"),
        ("WALSHIP_TLS_VERIFY", "", "tls_verify"),
        ("WALSHIP_COMPRESSION", "brotli", "brotli"),
        ("WALSHIP_CONCURRENCY", "four", "concurrency"),
        ("WALSHIP_CONCURRENCY", "0", "concurrency"),
        ("WALSHIP_PUSH_AHEAD", "-1", "push_ahead"),
        ("WALSHIP_PREFETCH", "-1", "prefetch"),
        ("WALSHIP_RETRY_BUDGET", "-1", "retry_budget"),
        ("WALSHIP_RETRY_BUDGET", "soon", "retry_budget"),
        ("WALSHIP_S3_PART_SIZE", "4MiB", "s3_part_size"),
        ("WALSHIP_S3_PART_SIZE", str(5 * MiB - 1), "s3_part_size"),
        ("WALSHIP_PARTITION_SIZE", "1023KiB", "partition_size"),
    ],
)
def test_bad_environment_values(var: str, value: str, named: str) -> None:
    exc = usage_error(environ={var: value})
    assert named in exc.message


def test_bad_value_names_its_source(tmp_path: Path) -> None:
    assert (
        "WALSHIP_FAST_CHECKPOINT"
        in usage_error(environ={"WALSHIP_FAST_CHECKPOINT": "maybe"}).message
    )
    toml = write_toml(tmp_path, 'fast_checkpoint = "maybe"\n')
    assert str(toml) in usage_error(environ={}, config_path=toml).message
    assert "--partition-size" in usage_error(options={"partition_size": "12XB"}, environ={}).message


@pytest.mark.parametrize(
    "text",
    [
        'compression = "brotli"\n',
        "concurrency = true\n",
        "partition_size = true\n",
        's3_part_size = "4MiB"\n',
        "s3_part_size = 1024\n",
        'fast_checkpoint = "maybe"\n',
        "tls_verify = 2\n",
        "concurrency = [1]\n",
    ],
)
def test_bad_toml_values(tmp_path: Path, text: str) -> None:
    usage_error(environ={}, config_path=write_toml(tmp_path, text))


def test_s3_part_size_minimum_is_allowed() -> None:
    assert load(environ={"WALSHIP_S3_PART_SIZE": "5MiB"}).s3_part_size == 5 * MiB


def test_secret_and_public_key_together() -> None:
    usage_error(environ={"WALSHIP_KEY_FILE": "/k", "WALSHIP_PUBLIC_KEY_FILE": "/k.pub"})


@pytest.mark.parametrize("value", ["verbose", "trace", ""])
def test_bad_log_level(value: str) -> None:
    assert "log_level" in usage_error(environ={"WALSHIP_LOG_LEVEL": value}).message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_retry_budget_must_be_finite(value: str) -> None:
    assert "retry_budget" in usage_error(environ={"WALSHIP_RETRY_BUDGET": value}).message


# --- private keys, secrets --------------------------------------------------------------------


def test_private_keys_from_environment() -> None:
    value = os.pathsep.join(["/keys/new.key", "/keys/old.key", ""])
    cfg = load(environ={"WALSHIP_PRIVATE_KEY_FILE": value})
    assert cfg.private_key_files == (Path("/keys/new.key"), Path("/keys/old.key"))
    assert load(environ={"WALSHIP_PRIVATE_KEY_FILE": "/one.key"}).private_key_files == (
        Path("/one.key"),
    )
    assert load(environ={"WALSHIP_PRIVATE_KEY_FILE": ""}).private_key_files == ()


def test_private_keys_from_toml(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'private_key_files = ["/keys/new.key", "/keys/old.key"]\n')
    cfg = load(environ={}, config_path=toml)
    assert cfg.private_key_files == (Path("/keys/new.key"), Path("/keys/old.key"))
    toml = write_toml(tmp_path, 'private_key_files = "/keys/only.key"\n')
    assert load(environ={}, config_path=toml).private_key_files == (Path("/keys/only.key"),)


def test_dsn_hidden_from_repr() -> None:
    cfg = load(environ={"WALSHIP_DSN": "host=db password=hunter2"})
    assert cfg.dsn == "host=db password=hunter2"
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(cfg)
    assert "dsn" not in repr(cfg)


def test_require_store() -> None:
    with pytest.raises(UsageError, match="no store configured"):
        Config().require_store()
    assert Config(store="file:///x").require_store() == "file:///x"


# --- to_environ round trip ------------------------------------------------------------------

_path_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00" + os.pathsep),
    min_size=1,
    max_size=20,
)
_paths = _path_text.map(Path)
_words = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    fields: dict[str, Any] = {
        "store": draw(st.none() | _words),
        "compression": draw(st.sampled_from(config_mod.COMPRESSIONS)),
        "private_key_files": tuple(draw(st.lists(_paths, max_size=3))),
        "retry_budget": draw(st.floats(min_value=0, max_value=1e6, allow_nan=False)),
        "concurrency": draw(st.integers(min_value=1, max_value=256)),
        "push_ahead": draw(st.integers(min_value=0, max_value=1000)),
        "prefetch": draw(st.integers(min_value=0, max_value=1000)),
        "spool_dir": draw(st.none() | _paths),
        "partition_size": draw(st.integers(min_value=MiB, max_value=1 << 44)),
        "fast_checkpoint": draw(st.booleans()),
        "dsn": draw(st.none() | _words),
        "s3_part_size": draw(st.integers(min_value=5 * MiB, max_value=5 * GiB)),
        "s3_sse": draw(st.none() | st.sampled_from(["aws:kms", "AES256"])),
        "tls_verify": draw(st.booleans()),
        "log_level": draw(st.sampled_from(["debug", "info", "warning", "error"])),
    }
    key = draw(st.sampled_from(["none", "secret", "public"]))
    if key == "secret":
        fields["key_file"] = draw(_paths)
    elif key == "public":
        fields["public_key_file"] = draw(_paths)
    return Config(**fields)


@given(configs())
def test_to_environ_round_trip(cfg: Config) -> None:
    env = cfg.to_environ()
    assert all(k.startswith("WALSHIP_") for k in env)
    assert all(isinstance(v, str) for v in env.values())
    assert load(environ=env) == cfg


def test_to_environ_uses_documented_names() -> None:
    cfg = Config(
        store="s3://bucket/p",
        private_key_files=(Path("/a"), Path("/b")),
        fast_checkpoint=False,
        dsn="host=x",
    )
    assert cfg.to_environ() == {
        "WALSHIP_STORE": "s3://bucket/p",
        "WALSHIP_PRIVATE_KEY_FILE": f"/a{os.pathsep}/b",
        "WALSHIP_FAST_CHECKPOINT": "false",
        "WALSHIP_DSN": "host=x",
    }


def test_every_field_has_an_environment_variable() -> None:
    everything = {f.name for f in dataclasses.fields(Config)}
    env = {f"WALSHIP_{name.upper()}" for name in everything - {"private_key_files"}}
    env.add("WALSHIP_PRIVATE_KEY_FILE")
    assert set(config_mod._ENV_NAMES.values()) == env


# --- parse_size / parse_bool ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1048576", MiB),
        ("512b", 512),
        ("64k", 64 * 1024),
        ("64KB", 64 * 1024),
        ("64KiB", 64 * 1024),
        ("16M", 16 * MiB),
        ("16mb", 16 * MiB),
        ("16MiB", 16 * MiB),
        (" 16 MiB ", 16 * MiB),
        ("1G", GiB),
        ("1GB", GiB),
        ("1GiB", GiB),
        ("2TiB", 2 * 1024 * GiB),
        ("1t", 1024 * GiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "MiB", "12XB", "1.5GiB", "-1", "+1", "1 2", "0x10", "1e6", "10 MiBs", "1iB", "ten"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("", 1), ("KiB", 1024), ("MiB", MiB), ("GiB", GiB), ("TiB", 1024 * GiB)]),
)
def test_parse_size_property(n: int, unit: tuple[str, int]) -> None:
    suffix, factor = unit
    assert parse_size(f"{n}{suffix}") == n * factor
    assert parse_size(f"{n}{suffix.lower()}") == n * factor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        (" True ", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "maybe", "2", "y", "n", "t", "f", "enable", "nope"])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


# --- docs/configuration.md stays in step with Config ------------------------------------------

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_field_is_documented() -> None:
    text = CONFIG_DOC.read_text()
    for f in dataclasses.fields(Config):
        row = f"| `{f.name}` | `{config_mod._ENV_NAMES[f.name]}` |"
        assert row in text, f"{f.name} is not in the settings table of {CONFIG_DOC}"


def test_documented_example_loads(tmp_path: Path) -> None:
    text = CONFIG_DOC.read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load(environ={}, config_path=write_toml(tmp_path, example))
    assert cfg.store == "s3://acme-pg-archive/prod/main"
    assert cfg.compression == "zstd"
    assert cfg.s3_part_size == 32 * MiB
    assert cfg.partition_size == GiB
    assert cfg.encrypted
