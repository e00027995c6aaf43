"""Regenerate the golden objects in this directory, deterministically.

    python tests/vectors/make_vectors.py

Only run this for a deliberate format change (with a new format version) or after a codec
library upgrade changed its compressed output; tests/unit/test_format_vectors.py says which.
Keys and randomness are fixed, so running it twice writes identical files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lz4.frame
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from walship import crypto, pipeline  # noqa: E402

# Fixed test keys. Never use these for anything else: they are public.
SECRET = bytes(range(32))
PRIVATE = bytes(range(32, 64))


def deterministic_random(seed: str) -> Callable[[int], bytes]:
    """An os.urandom stand-in: SHA-256(seed || counter) blocks. Reproducible, not secret."""
    state = {"counter": 0}

    def random(n: int) -> bytes:
        out = b""
        while len(out) < n:
            block = f"{seed}/{state['counter']}".encode()
            state["counter"] += 1
            out += hashlib.sha256(block).digest()
        return out[:n]

    return random


def plaintexts() -> dict[str, bytes]:
    """The plaintexts the vectors encode: empty, short text, and one crossing a chunk."""
    pattern = bytes((i * 7 + i // 251) % 256 for i in range(65536 + 100))
    return {
        "empty": b"",
        "hello": b"hello walship\n",
        "twochunks": pattern,
    }


def keyrings() -> dict[str, crypto.Keyring | None]:
    """Keyrings by mode name."""
    secret = crypto.SecretKey(SECRET)
    private = crypto.PrivateKey(PRIVATE)
    return {
        "plain": None,
        "symmetric": crypto.Keyring(secret, (secret,)),
        "x25519": crypto.Keyring(private.public, (private,)),
    }


# (mode, codec, plaintext name)
CASES = [
    ("plain", "lz4", "hello"),
    ("plain", "zstd", "hello"),
    ("plain", "gzip", "hello"),
    ("plain", "none", "hello"),
    ("symmetric", "none", "empty"),
    ("symmetric", "none", "twochunks"),
    ("symmetric", "lz4", "hello"),
    ("x25519", "none", "empty"),
    ("x25519", "none", "twochunks"),
    ("x25519", "zstd", "hello"),
]


def library_versions() -> dict[str, str]:
    """Versions of the codec libraries whose output the compressed vectors depend on."""
    import zlib

    return {"lz4": lz4.library_version_string(),
            "zstd": zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION)),
            "zlib": zlib.ZLIB_RUNTIME_VERSION}


def build() -> tuple[dict[str, bytes], dict[str, object]]:
    """All files (name -> bytes) and the manifest."""
    files: dict[str, bytes] = {}
    texts = plaintexts()
    for name, data in texts.items():
        files[f"{name}.plain"] = data
    files["secret.key"] = crypto.format_key_file(
        crypto.SECRET_LABEL, SECRET, "walship test vector key: public, never use it").encode()
    private = crypto.PrivateKey(PRIVATE)
    files["private.key"] = crypto.format_key_file(
        crypto.PRIVATE_LABEL, PRIVATE, "walship test vector key: public, never use it").encode()
    files["private.key.pub"] = crypto.format_key_file(
        crypto.PUBLIC_LABEL, private.public.raw, "walship test vector key").encode()
    rings = keyrings()
    entries = []
    for mode, codec, text in CASES:
        name = f"{mode}-{codec}-{text}"
        blob = pipeline.encode_bytes(texts[text], codec, rings[mode],
                                     random=deterministic_random(name))
        files[f"{name}.obj"] = blob
        entries.append({"name": name, "mode": mode, "codec": codec, "plaintext": text,
                        "object_sha256": hashlib.sha256(blob).hexdigest()})
    manifest: dict[str, object] = {
        "format_version": 1,
        "secret_key_id": crypto.SecretKey(SECRET).key_id.hex(),
        "x25519_key_id": private.key_id.hex(),
        "libraries": library_versions(),
        "vectors": entries,
    }
    return files, manifest


def main() -> int:
    files, manifest = build()
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    (HERE / "vectors.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(files) + 1} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
