"""The manifest a stage writes beside its outputs: what ran, on what, with which libraries, and what it made."""

from __future__ import annotations

import hashlib
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "stage-manifest.json"
LIBRARIES = ("teleguard", "ms-swift", "transformers", "trl", "peft", "torch", "vllm")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """One digest for a file or a whole folder (relative paths and file digests, in order)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(folder: Path, **fields: Any) -> Path:
    path = folder / MANIFEST
    body = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    path.write_text(json.dumps({**fields, **body}, ensure_ascii=False, indent=2, default=str) + "\n", "utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text("utf-8")) if path.is_file() else None
