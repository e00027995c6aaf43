"""Golden objects: the stored format must not drift, and docs/format.md must not lie."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import zstandard

from walship import crypto, pipeline
from walship import format as fmt
from walship.errors import IntegrityError

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(VECTORS))

import make_vectors  # noqa: E402

MANIFEST: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
ENTRIES = MANIFEST["vectors"]


def private_copy(tmp_path: Path, name: str) -> Path:
    """Key files lose their 0600 mode in git; walship rightly refuses them, so copy."""
    dest = tmp_path / name
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write((VECTORS / name).read_bytes())
    return dest


@pytest.fixture
def rings(tmp_path: Path) -> dict[str, crypto.Keyring | None]:
    secret = crypto.load_secret_key(private_copy(tmp_path, "secret.key"))
    private = crypto.load_private_key(private_copy(tmp_path, "private.key"))
    public = crypto.load_public_key(VECTORS / "private.key.pub")
    assert public == private.public
    assert secret.key_id.hex() == MANIFEST["secret_key_id"]
    assert private.key_id.hex() == MANIFEST["x25519_key_id"]
    return {"plain": None, "symmetric": crypto.Keyring(secret, (secret,)),
            "x25519": crypto.Keyring(public, (private,))}


def test_manifest_covers_every_mode() -> None:
    assert MANIFEST["format_version"] == fmt.VERSION
    assert {e["mode"] for e in ENTRIES} == {"plain", "symmetric", "x25519"}
    assert {e["codec"] for e in ENTRIES} == {"lz4", "zstd", "gzip", "none"}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_golden_object_decodes(entry: dict[str, str],
                               rings: dict[str, crypto.Keyring | None]) -> None:
    blob = (VECTORS / f"{entry['name']}.obj").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == entry["object_sha256"], "vector file changed"
    plain = (VECTORS / f"{entry['plaintext']}.plain").read_bytes()
    assert pipeline.decode_bytes(blob, rings[entry["mode"]]) == plain


def _libraries_changed(codec: str) -> str | None:
    now = make_vectors.library_versions()
    lib = {"lz4": "lz4", "zstd": "zstd", "gzip": "zlib"}.get(codec)
    if lib and now[lib] != MANIFEST["libraries"][lib]:
        return f"{lib} {now[lib]} != {MANIFEST['libraries'][lib]} used for the vectors"
    return None


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_golden_object_reencodes_byte_for_byte(
        entry: dict[str, str], rings: dict[str, crypto.Keyring | None]) -> None:
    changed = _libraries_changed(entry["codec"])
    if changed:  # pragma: no cover - only after a codec library upgrade
        pytest.skip(f"compressed output may legitimately differ: {changed}")
    plain = (VECTORS / f"{entry['plaintext']}.plain").read_bytes()
    blob = pipeline.encode_bytes(plain, entry["codec"], rings[entry["mode"]],
                                 random=make_vectors.deterministic_random(entry["name"]))
    assert blob == (VECTORS / f"{entry['name']}.obj").read_bytes(), (
        "the stored format drifted: old objects must stay readable; bump the format version"
    )


def test_generator_is_deterministic() -> None:
    files, manifest = make_vectors.build()
    for name, data in files.items():
        assert (VECTORS / name).read_bytes() == data, name
    assert manifest == MANIFEST


def test_header_layout_pinned() -> None:
    blob = (VECTORS / "symmetric-none-empty.obj").read_bytes()
    assert blob[:8] == b"\x89walship" and blob[8:12] == bytes([1, 1, 1, 0])
    assert blob[12:16] == (65536).to_bytes(4, "big")
    assert blob[16:24].hex() == MANIFEST["secret_key_id"]
    assert len(blob) == 40 + 16  # header + one empty sealed final chunk
    blob = (VECTORS / "x25519-none-empty.obj").read_bytes()
    assert blob[9] == 2 and len(blob) == 120 + 16
    assert fmt.parse_header(blob[:120]).raw == blob[:120]


def _doc_snippet() -> str:
    text = (ROOT / "docs" / "format.md").read_text()
    section = text[text.index("### Worked example"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/format.md lost its worked example"
    return match.group(1)


def test_doc_worked_example_decrypts(rings: dict[str, crypto.Keyring | None]) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_doc_snippet(), "docs/format.md", "exec"), namespace)  # noqa: S102
    decrypt = namespace["decrypt_object"]
    keys = {"symmetric": (VECTORS / "secret.key").read_text(),
            "x25519": (VECTORS / "private.key").read_text()}
    for entry in ENTRIES:
        if entry["mode"] == "plain":
            continue
        blob = (VECTORS / f"{entry['name']}.obj").read_bytes()
        plain = (VECTORS / f"{entry['plaintext']}.plain").read_bytes()
        if entry["codec"] in ("none", "lz4"):
            assert decrypt(blob, keys[entry["mode"]]) == plain, entry["name"]
    # And fresh, larger objects, including an exact multiple of the chunk size.
    for size in (0, 65536, 2 * 65536, 200_000):
        data = os.urandom(size)
        for mode, codec in (("symmetric", "lz4"), ("x25519", "none")):
            blob = pipeline.encode_bytes(data, codec, rings[mode])
            assert decrypt(blob, keys[mode]) == data


def test_unencrypted_vectors_are_plain_frames() -> None:
    hello = (VECTORS / "hello.plain").read_bytes()
    assert lz4.frame.decompress((VECTORS / "plain-lz4-hello.obj").read_bytes()) == hello
    assert zstandard.ZstdDecompressor().decompress(max_output_size=1000, data=
        (VECTORS / "plain-zstd-hello.obj").read_bytes()) == hello
    assert zlib.decompress((VECTORS / "plain-gzip-hello.obj").read_bytes(), 31) == hello
    assert (VECTORS / "plain-none-hello.obj").read_bytes() == hello


def test_encrypted_lz4_written_with_a_content_checksum_still_decodes(
        rings: dict[str, crypto.Keyring | None]) -> None:
    # Until 2026-11-21 the lz4 frame inside an encrypted object carried XXH32; since then it
    # does not (the AEAD authenticates every chunk; docs/format.md). Both must decode, and
    # the only difference is the 4-byte checksum.
    legacy = (VECTORS / "legacy" / "symmetric-lz4-hello-xxh32.obj").read_bytes()
    assert hashlib.sha256(legacy).hexdigest() == (
        "e9a5961d4e344c0b1ede80579cd847d82272397b0403b7897f2a5877969d9e2a")
    hello = (VECTORS / "hello.plain").read_bytes()
    assert pipeline.decode_bytes(legacy, rings["symmetric"]) == hello
    current = (VECTORS / "symmetric-lz4-hello.obj").read_bytes()
    assert len(legacy) == len(current) + 4
    damaged = bytearray(legacy)
    damaged[60] ^= 0x01
    with pytest.raises(IntegrityError):
        pipeline.decode_bytes(bytes(damaged), rings["symmetric"])
