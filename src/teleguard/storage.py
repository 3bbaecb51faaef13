"""One place to read and write datasets, checkpoints and reports: a local folder or S3 (MinIO in a cluster).

URIs: a plain path, ``file:///abs/path``, ``s3://bucket/prefix`` or ``minio://bucket/prefix`` (the same thing).
The S3 endpoint and keys come only from the environment (see :meth:`S3Config.from_env`), never from code,
and never show up in reprs, exceptions or log lines.

Folders written with :meth:`Storage.put_dir` carry a ``manifest.json`` at their root listing every file's
relative path, size and sha256. It is written last, so its presence means the upload finished;
:meth:`Storage.get_dir` and :meth:`Storage.verify` check every file against it and raise
:class:`ChecksumError` naming each bad or missing file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mimetypes
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

import urllib3
from minio import Minio
from minio.datatypes import Object
from minio.error import MinioException, S3Error

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FILES",
    "MODEL_MOUNT_DIRS",
    "ChecksumError",
    "FileEntry",
    "FileProblem",
    "LocalLocation",
    "LocalStorage",
    "Location",
    "Manifest",
    "ModelLocationError",
    "S3Config",
    "S3Location",
    "S3Storage",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "exists",
    "get_dir",
    "list_files",
    "local_copy",
    "open_storage",
    "parse_uri",
    "put_dir",
    "read_bytes",
    "resolve_model",
    "verify",
    "write_bytes",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CHUNK_SIZE = 1024 * 1024  # streaming unit for hashing, copies and downloads
# Files transferred at once. minio also uploads 3 parts of each large file in parallel, and its connection
# pool holds 10: 3 x 3 stays inside it (more only means urllib3 "pool is full" warnings and new connections).
DEFAULT_WORKERS = 3
CACHE_DIR_ENV = "TELEGUARD_STORAGE_CACHE"

ENDPOINT_VARS = ("S3_ENDPOINT", "AWS_ENDPOINT_URL")
KEY_PAIRS = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"))
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
SESSION_TOKEN_VAR = "AWS_SESSION_TOKEN"

_T = TypeVar("_T")
_R = TypeVar("_R")


# --------------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed (messages never carry credentials)."""


class StorageConfigError(StorageError, ValueError):
    """The environment does not describe a usable S3 endpoint or credentials."""


@dataclass(frozen=True)
class FileProblem:
    """One file that failed verification; ``actual_*`` is None when the file is missing."""

    path: str
    expected_sha256: str
    actual_sha256: str | None
    expected_size: int
    actual_size: int | None

    def describe(self) -> str:
        if self.actual_sha256 is None:
            return (
                f"{self.path!r}: missing (expected sha256 {self.expected_sha256}, {self.expected_size} bytes)"
            )
        return (
            f"{self.path!r}: sha256 expected {self.expected_sha256}, actual {self.actual_sha256} "
            f"(size expected {self.expected_size}, actual {self.actual_size})"
        )


class ChecksumError(StorageError):
    """Stored files do not match their manifest (or the manifest is missing or unreadable)."""

    def __init__(self, message: str, problems: Sequence[FileProblem] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[FileProblem, ...] = tuple(problems)

    @classmethod
    def from_problems(cls, uri: str, problems: Sequence[FileProblem], total: int) -> ChecksumError:
        lines = "\n  ".join(p.describe() for p in problems)
        return cls(f"{uri}: {len(problems)} of {total} file(s) failed verification:\n  {lines}", problems)


# ------------------------------------------------------------------------------------------ locations


@dataclass(frozen=True)
class LocalLocation:
    path: Path

    @property
    def uri(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # object-key prefix without leading or trailing "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


Location = LocalLocation | S3Location

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KNOWN_SCHEMES = ("file", "s3", "minio")


def _mask_userinfo(text: str) -> str:
    """Hide anything before an '@' after '://', so a credential typed into a URI never reaches a message."""
    head, sep, rest = text.partition("://")
    if sep and "@" in rest:
        return f"{head}://***@{rest.rsplit('@', 1)[1]}"
    return text


def _invalid_uri(uri: str, why: str) -> ValueError:
    return ValueError(f"invalid storage URI {_mask_userinfo(uri)!r}: {why}")


def _clean_key(key: str) -> str:
    """Normalise a relative object key / path; raises ValueError with the reason."""
    if "\x00" in key:
        raise ValueError(f"invalid key {key!r}: contains a NUL byte")
    if key.startswith("/"):
        raise ValueError(f"invalid key {key!r}: must be relative (no leading '/')")
    key = key.rstrip("/")
    if not key:
        return ""
    for segment in key.split("/"):
        if segment == "":
            raise ValueError(f"invalid key {key!r}: empty path segment ('//')")
        if segment in (".", ".."):
            # '..' would let a manifest or caller escape the destination folder.
            raise ValueError(f"invalid key {key!r}: '.' and '..' segments are not allowed")
    return key


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Parse a storage URI once into a typed location; malformed input raises ValueError saying why."""
    if isinstance(uri, os.PathLike):
        return LocalLocation(Path(uri))
    if not isinstance(uri, str):
        raise TypeError(f"storage URI must be a str or path, not {type(uri).__name__}")
    if not uri.strip():
        raise ValueError("invalid storage URI '': empty")
    match = _SCHEME_RE.match(uri)
    # One-letter "schemes" are Windows drives (C:\...), anything else without '//' is a file name.
    if match is None or (len(match.group(1)) == 1 and not match.group(2)):
        return LocalLocation(Path(uri).expanduser())
    scheme = match.group(1).lower()
    if not match.group(2):
        if scheme in _KNOWN_SCHEMES:  # "s3:bucket" or "s3:/bucket": a typo, not a local file name
            raise _invalid_uri(uri, f"'{scheme}:' must be followed by '//' (e.g. {scheme}://bucket/prefix)")
        return LocalLocation(Path(uri).expanduser())
    if scheme not in _KNOWN_SCHEMES:
        raise _invalid_uri(
            uri, f"unsupported scheme {scheme!r}; use a local path, file://, s3:// or minio://"
        )
    rest = uri[match.end() :]
    authority, _, path = rest.partition("/")
    # "key:secret@bucket" (the secret may even hold a '/'): refuse, and never echo the authority.
    if "@" in authority or (":" in authority and "@" in rest):
        raise _invalid_uri(uri, "credentials do not belong in the URI; set them in the environment")

    if scheme == "file":
        if authority not in ("", "localhost"):
            raise _invalid_uri(uri, f"file URIs take no host ({authority!r}); use file:///absolute/path")
        return LocalLocation(Path("/" + unquote(path)))

    if not authority:
        raise _invalid_uri(uri, "missing bucket name (expected s3://bucket/prefix)")
    if authority.lower() != authority:
        raise _invalid_uri(uri, f"bucket name {authority!r} must be lowercase")
    if not _BUCKET_RE.match(authority) or ".." in authority or _IPV4_RE.match(authority):
        raise _invalid_uri(
            uri,
            f"bucket name {authority!r} is not valid (3-63 characters: lowercase letters, digits, '.', '-'; "
            "starting and ending with a letter or digit)",
        )
    if path.startswith("/"):
        raise _invalid_uri(uri, "empty path segment ('//') after the bucket name")
    try:
        prefix = _clean_key(path)
    except ValueError as err:
        raise _invalid_uri(uri, str(err)) from None
    return S3Location(bucket=authority, prefix=prefix)


# ---------------------------------------------------------------------------------------- S3 config


def _first_set(environ: Mapping[str, str], names: Iterable[str]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _parse_endpoint(var: str, raw: str) -> tuple[str, bool]:
    """'http://host:9000' -> ('host:9000', secure=False): minio wants host[:port] plus a TLS flag."""
    shown = f"{var}={_mask_userinfo(raw)!r}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise StorageConfigError(f"{shown} must start with http:// or https:// (the scheme decides TLS)")
    if "@" in raw:  # checked on the whole value: a secret holding '/' would end urlsplit's netloc early
        raise StorageConfigError(
            f"{shown} must not embed credentials; set {KEY_PAIRS[0][0]}/{KEY_PAIRS[0][1]}"
        )
    if not parts.hostname:
        raise StorageConfigError(f"{shown} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise StorageConfigError(f"{shown} must be scheme://host[:port] with no path")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise StorageConfigError(f"{shown} has an invalid port") from None
    return parts.netloc, parts.scheme == "https"


@dataclass(frozen=True)
class S3Config:
    """Endpoint and credentials for S3/MinIO; the secret fields are left out of repr and str."""

    endpoint: str  # host[:port]
    secure: bool
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str | None = None
    session_token: str | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.access_key, self.secret_key, self.session_token) if s)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, uri: str = "S3") -> S3Config:
        """Read S3_ENDPOINT|AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the MINIO_ pair),
        optional AWS_REGION|AWS_DEFAULT_REGION and AWS_SESSION_TOKEN."""
        env = os.environ if environ is None else environ
        found = _first_set(env, ENDPOINT_VARS)
        if found is None:
            raise StorageConfigError(
                f"{uri} needs an S3 endpoint: set {' or '.join(ENDPOINT_VARS)} (e.g. http://127.0.0.1:9000)"
            )
        endpoint, secure = _parse_endpoint(*found)
        for access_var, secret_var in KEY_PAIRS:
            access, secret = env.get(access_var, "").strip(), env.get(secret_var, "").strip()
            if access and secret:
                break
            if access or secret:  # half a pair is a mistake worth naming, not a reason to try the next pair
                missing = secret_var if access else access_var
                raise StorageConfigError(f"{uri}: {missing} is not set (its partner is)")
        else:
            pairs = " or ".join(f"{a} and {s}" for a, s in KEY_PAIRS)
            raise StorageConfigError(f"{uri} needs S3 credentials: set {pairs}")
        region = _first_set(env, REGION_VARS)
        # A session token belongs to the AWS key pair; sent alongside MinIO keys it would break signing.
        token = (env.get(SESSION_TOKEN_VAR, "").strip() or None) if access_var == KEY_PAIRS[0][0] else None
        return cls(endpoint, secure, access, secret, region[1] if region else None, token)


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "algorithm": "sha256",
            "files": [asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        """Parse and validate; paths are checked so a tampered manifest cannot write outside the target."""
        try:
            doc = json.loads(data)
            if doc.get("version") != MANIFEST_VERSION or doc.get("algorithm") != "sha256":
                raise ValueError(
                    f"unsupported version/algorithm {doc.get('version')!r}/{doc.get('algorithm')!r}"
                )
            entries = []
            for item in doc["files"]:
                path, size, digest = item["path"], item["size"], item["sha256"]
                if not isinstance(path, str) or _clean_key(path) != path or not path:
                    raise ValueError(f"unsafe or non-normalised path {path!r}")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise ValueError(f"bad size {size!r} for {path!r}")
                if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                    raise ValueError(f"bad sha256 {digest!r} for {path!r}")
                entries.append(FileEntry(path, size, digest))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ChecksumError(f"{source} is not a valid manifest: {err}") from None
        if len({e.path for e in entries}) != len(entries):
            raise ChecksumError(f"{source} lists a path twice")
        return cls(tuple(entries))


# -------------------------------------------------------------------------------------------- helpers


class _HashingReader:
    """File wrapper that hashes what minio reads, so an upload and its checksum take a single pass."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            yield chunk


def _hash_chunks(chunks: Iterable[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _write_chunks(path: Path, chunks: Iterable[bytes]) -> tuple[int, str]:
    """Stream chunks into a new file, hashing on the way; returns (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    with path.open("xb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    """A not-yet-created temp path next to target (same filesystem, so os.replace is atomic).

    Readers never see a half-written file; the temp is removed unless it was moved into place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.part"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _local_matches(path: Path, entry: FileEntry) -> bool:
    """A local file already equal to its manifest entry need not be fetched again (resume, caches)."""
    if not path.is_file() or path.stat().st_size != entry.size:
        return False
    return _hash_chunks(_file_chunks(path))[1] == entry.sha256


def _walk_files(root: Path) -> list[str]:
    """Relative '/'-paths of every file under root, minus the root manifest (put_dir writes a fresh one)."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != MANIFEST_NAME)


def _map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _default_cache_dir() -> Path:
    if explicit := os.environ.get(CACHE_DIR_ENV):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "teleguard" / "storage"


def _prune(root: Path, keep: set[str]) -> None:
    """Drop cached files the source no longer lists, so a cached folder mirrors its manifest exactly."""
    for path in root.rglob("*"):
        if path.is_file() and path.relative_to(root).as_posix() not in keep:
            path.unlink()


# -------------------------------------------------------------------------------------------- storage


class Storage(ABC):
    """A folder-like location; every ``key`` argument is relative to it ('' means the location itself)."""

    location: Location

    @staticmethod
    def from_uri(uri: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Storage:
        location = parse_uri(uri)
        if isinstance(location, LocalLocation):
            return LocalStorage(location)
        return S3Storage(location, S3Config.from_env(environ, uri=location.uri))

    @property
    def uri(self) -> str:
        return self.location.uri

    def uri_of(self, key: str = "") -> str:
        key = _clean_key(key)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uri={self.uri!r})"

    # Primitives each backend provides.
    @abstractmethod
    def read_bytes(self, key: str = "") -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def exists(self, key: str = "") -> bool:
        """True for a file, or a folder with at least one file under it."""

    @abstractmethod
    def list_files(self, key: str = "") -> list[str]:
        """Every file under the folder at key, recursively, as sorted '/'-paths relative to it."""

    @abstractmethod
    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        """Stream a file's bytes; raises FileNotFoundError (on first next()) when it does not exist."""

    @abstractmethod
    def _put_file(self, key: str, src: Path) -> tuple[int, str]:
        """Store a local file at key, streaming; returns the (size, sha256) of what was stored."""

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    def _prepare_write(self) -> None:  # noqa: B027 - optional hook, a no-op for local folders
        """Hook run once before writes (S3 creates the bucket)."""

    # Shared behaviour built on the primitives.
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> FileEntry:
        """Upload one local file (streamed) to key."""
        self._prepare_write()
        size, digest = self._put_file(_clean_key(key), Path(local_path))
        return FileEntry(_clean_key(key), size, digest)

    def put_dir(
        self, local_dir: str | os.PathLike[str], key: str = "", *, workers: int = DEFAULT_WORKERS
    ) -> Manifest:
        """Upload every file under local_dir, then write manifest.json (path, size, sha256 of each)."""
        src, key = Path(local_dir), _clean_key(key)
        if not src.is_dir():
            raise NotADirectoryError(f"put_dir source {src} is not a folder")
        rels = _walk_files(src)
        self._prepare_write()
        # An old manifest next to new files would vouch for the wrong content while we upload.
        self._delete(_join(key, MANIFEST_NAME))

        def upload(rel: str) -> FileEntry:
            size, digest = self._put_file(_join(key, rel), src / rel)
            return FileEntry(rel, size, digest)

        manifest = Manifest(tuple(_map(upload, rels, workers)))
        # Written last: a manifest at the destination means every file before it has landed.
        self.write_bytes(_join(key, MANIFEST_NAME), manifest.to_json())
        log.info(
            "put_dir %s -> %s: %d files, %d bytes", src, self.uri_of(key), len(rels), manifest.total_size
        )
        return manifest

    def read_manifest(self, key: str = "") -> Manifest:
        key = _clean_key(key)
        manifest_key = _join(key, MANIFEST_NAME)
        try:
            data = self.read_bytes(manifest_key)
        except FileNotFoundError:
            if not self.exists(key):
                raise FileNotFoundError(f"nothing stored at {self.uri_of(key)}") from None
            raise ChecksumError(
                f"{self.uri_of(key)} has no {MANIFEST_NAME}; write it with put_dir, or get_dir(verify=False)"
            ) from None
        return Manifest.from_json(data, self.uri_of(manifest_key))

    def get_dir(
        self,
        local_dir: str | os.PathLike[str],
        key: str = "",
        *,
        verify: bool = True,
        workers: int = DEFAULT_WORKERS,
    ) -> Manifest:
        """Download the folder at key into local_dir.

        With verify (the default) the manifest decides what is fetched and every file is checked against it;
        local files that already match are not fetched again; a file that fails is not left in place, and
        ChecksumError lists every bad or missing file. verify=False fetches whatever is listed, unchecked.
        """
        dest, key = Path(local_dir), _clean_key(key)
        if verify:
            manifest = self.read_manifest(key)
            wanted = list(manifest.files)
        else:
            rels = [r for r in self.list_files(key) if r != MANIFEST_NAME]
            if not rels and not self.exists(key):
                raise FileNotFoundError(f"nothing stored at {self.uri_of(key)}")
            wanted = [FileEntry(r, -1, "") for r in rels]

        def fetch(entry: FileEntry) -> FileEntry | FileProblem:
            target = dest / entry.path
            if verify and _local_matches(target, entry):
                return entry
            with _temp_beside(target) as tmp:
                try:
                    size, digest = _write_chunks(tmp, self._iter_chunks(_join(key, entry.path)))
                except FileNotFoundError:
                    return FileProblem(entry.path, entry.sha256, None, entry.size, None)
                if verify and (digest != entry.sha256 or size != entry.size):
                    return FileProblem(entry.path, entry.sha256, digest, entry.size, size)
                os.replace(tmp, target)
            return FileEntry(entry.path, size, digest)

        results = _map(fetch, wanted, workers)
        problems = [r for r in results if isinstance(r, FileProblem)]
        if problems:
            raise ChecksumError.from_problems(self.uri_of(key), problems, len(wanted))
        got = Manifest(tuple(r for r in results if isinstance(r, FileEntry)))
        if verify:  # the local copy stays self-describing and can be verified or re-uploaded as is
            (dest / MANIFEST_NAME).write_bytes(got.to_json())
        log.info("get_dir %s -> %s: %d files, %d bytes", self.uri_of(key), dest, len(wanted), got.total_size)
        return got

    def verify(self, key: str = "", *, workers: int = DEFAULT_WORKERS) -> Manifest:
        """Re-hash every file of a stored folder in place against its manifest (streamed, nothing kept)."""
        key = _clean_key(key)
        manifest = self.read_manifest(key)

        def check(entry: FileEntry) -> FileProblem | None:
            try:
                size, digest = _hash_chunks(self._iter_chunks(_join(key, entry.path)))
            except FileNotFoundError:
                return FileProblem(entry.path, entry.sha256, None, entry.size, None)
            if digest != entry.sha256 or size != entry.size:
                return FileProblem(entry.path, entry.sha256, digest, entry.size, size)
            return None

        problems = [p for p in _map(check, list(manifest.files), workers) if p is not None]
        if problems:
            raise ChecksumError.from_problems(self.uri_of(key), problems, len(manifest.files))
        return manifest

    @abstractmethod
    def local_copy(self, key: str = "", *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local path holding the file or folder at key: the path itself when local, else a cached copy."""


class LocalStorage(Storage):
    def __init__(self, location: LocalLocation) -> None:
        self.location = location

    def _path(self, key: str) -> Path:
        key = _clean_key(key)
        return self.location.path / key if key else self.location.path

    def read_bytes(self, key: str = "") -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        with _temp_beside(target) as tmp:
            tmp.write_bytes(data)
            os.replace(tmp, target)

    def exists(self, key: str = "") -> bool:
        path = self._path(key)
        return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))

    def list_files(self, key: str = "") -> list[str]:
        root = self._path(key)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        return _file_chunks(self._path(key))

    def _put_file(self, key: str, src: Path) -> tuple[int, str]:
        target = self._path(key)
        with _temp_beside(target) as tmp:
            result = _write_chunks(tmp, _file_chunks(src))
            os.replace(tmp, target)
        return result

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_copy(self, key: str = "", *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        path = self._path(key)
        if not path.exists():
            raise FileNotFoundError(f"nothing stored at {path}")
        return path


_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchObject"})


def _is_not_found(err: S3Error) -> bool:
    return err.code in _NOT_FOUND_CODES


class S3Storage(Storage):
    """S3/MinIO through the minio client; credentials live only in ``config`` and the client."""

    def __init__(self, location: S3Location, config: S3Config, *, part_size: int = 0) -> None:
        self.location = location
        self.config = config
        # 0 lets minio size parts itself: 5 MiB, growing for huge files to stay within 10,000 parts.
        self.part_size = part_size
        self._client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            session_token=config.session_token,
            secure=config.secure,
            region=config.region,
        )
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3Storage(uri={self.uri!r}, endpoint={self.config.endpoint_url!r})"

    @property
    def client(self) -> Minio:
        return self._client

    def _redact(self, text: str) -> str:
        for secret in self.config.secrets:
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def _errors(self, action: str, object_key: str) -> Iterator[None]:
        """Turn minio/urllib3 errors into FileNotFoundError or StorageError with credentials scrubbed.

        The original exception is dropped (``from None``) because servers may echo request details.
        """
        where = f"s3://{self.location.bucket}/{object_key}"
        try:
            yield
        except S3Error as err:
            if _is_not_found(err):
                raise FileNotFoundError(f"{action}: not found: {where}") from None
            raise StorageError(self._redact(f"{action} {where} failed: {err.code}: {err.message}")) from None
        except (MinioException, urllib3.exceptions.HTTPError) as err:
            raise StorageError(
                self._redact(f"{action} {where} failed: {type(err).__name__}: {err}")
            ) from None

    def _object_key(self, key: str) -> str:
        return _join(self.location.prefix, _clean_key(key))

    def _require_object_key(self, key: str) -> str:
        full = self._object_key(key)
        if not full:
            raise ValueError(f"{self.uri} names a bucket, not an object")
        return full

    def _stat(self, object_key: str) -> Object | None:
        with self._errors("stat", object_key):
            try:
                return self._client.stat_object(self.location.bucket, object_key)
            except S3Error as err:
                if _is_not_found(err) or getattr(err.response, "status", None) == 404:
                    return None
                raise

    def _prepare_write(self) -> None:
        if self._bucket_ready:
            return
        bucket = self.location.bucket
        with self._errors("create bucket", ""):
            if not self._client.bucket_exists(bucket):
                try:
                    self._client.make_bucket(bucket)
                except S3Error as err:
                    if err.code != "BucketAlreadyOwnedByYou":  # lost a harmless race with another writer
                        raise
        self._bucket_ready = True

    def read_bytes(self, key: str = "") -> bytes:
        return b"".join(self._iter_chunks(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._require_object_key(key)
        self._prepare_write()
        with self._errors("write", full):
            self._client.put_object(
                self.location.bucket, full, io.BytesIO(data), len(data), content_type=_content_type(full)
            )

    def exists(self, key: str = "") -> bool:
        full = self._object_key(key)
        bucket = self.location.bucket
        with self._errors("exists", full):
            try:
                if not full:
                    if not self._client.bucket_exists(bucket):
                        return False
                elif self._stat(full) is not None:
                    return True
                # A "folder" exists when at least one object lives under it; one listing page is enough.
                listing = self._client.list_objects(
                    bucket, prefix=f"{full}/" if full else None, recursive=True
                )
                return next(iter(listing), None) is not None
            except S3Error as err:
                if _is_not_found(err):
                    return False
                raise

    def list_files(self, key: str = "") -> list[str]:
        full = self._object_key(key)
        prefix = f"{full}/" if full else ""
        names: list[str] = []
        with self._errors("list", prefix):
            try:
                for obj in self._client.list_objects(
                    self.location.bucket, prefix=prefix or None, recursive=True
                ):
                    name = obj.object_name or ""
                    if obj.is_dir or name.endswith("/"):  # folder markers some tools create
                        continue
                    names.append(name[len(prefix) :])
            except S3Error as err:
                if err.code == "NoSuchBucket":
                    return []
                raise
        return sorted(names)

    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        full = self._require_object_key(key)
        with self._errors("read", full):
            response = self._client.get_object(self.location.bucket, full)
        try:
            with self._errors("read", full):
                yield from response.stream(CHUNK_SIZE)
        finally:
            response.close()
            response.release_conn()

    def _put_file(self, key: str, src: Path) -> tuple[int, str]:
        full = self._require_object_key(key)
        size = src.stat().st_size
        with src.open("rb") as fh:
            reader = _HashingReader(fh)
            with self._errors("upload", full):
                # Known length: minio switches to a parallel multipart upload above one part and reads the
                # stream once, in order, so the digest is of exactly the bytes that were sent.
                self._client.put_object(
                    self.location.bucket,
                    full,
                    reader,  # type: ignore[arg-type]  # duck-typed: minio only calls read()
                    length=size,
                    part_size=self.part_size,
                    content_type=_content_type(full),
                )
        return reader.size, reader.hexdigest()

    def _delete(self, key: str) -> None:
        full = self._require_object_key(key)
        with self._errors("delete", full):
            self._client.remove_object(self.location.bucket, full)

    def local_copy(self, key: str = "", *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """Cached under <cache>/<endpoint>/<bucket>/<key>; files are re-fetched when their ETag changes,
        folders with a manifest only for files whose sha256 differs."""
        full = self._object_key(key)
        endpoint_dir = re.sub(r"[^A-Za-z0-9.-]", "_", self.config.endpoint)
        root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        target = (
            root / endpoint_dir / self.location.bucket / full
            if full
            else root / endpoint_dir / self.location.bucket
        )
        stat = self._stat(full) if full else None
        if stat is not None:
            return self._cached_file(key, stat, target)
        if self._stat(_join(full, MANIFEST_NAME)) is None:
            log.warning("%s has no %s: its local copy is not verified", self.uri_of(key), MANIFEST_NAME)
            manifest = self.get_dir(target, key, verify=False)
        else:
            manifest = self.get_dir(target, key)
        _prune(target, {f.path for f in manifest.files} | {MANIFEST_NAME})
        return target

    def _cached_file(self, key: str, stat: Object, target: Path) -> Path:
        stamp_path = target.parent / f".{target.name}.s3stamp"
        stamp = {"etag": stat.etag, "size": stat.size}
        try:
            if target.is_file() and json.loads(stamp_path.read_text()) == stamp:
                return target
        except (OSError, ValueError):
            pass  # no or unreadable stamp: fetch again
        with _temp_beside(target) as tmp:
            _write_chunks(tmp, self._iter_chunks(key))
            os.replace(tmp, target)
        stamp_path.write_text(json.dumps(stamp))
        return target


# ---------------------------------------------------------------------------------- URI-level helpers


def open_storage(uri: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Storage:
    return Storage.from_uri(uri, environ=environ)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    return Storage.from_uri(uri).read_bytes()


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    Storage.from_uri(uri).write_bytes("", data)


def exists(uri: str | os.PathLike[str]) -> bool:
    return Storage.from_uri(uri).exists()


def list_files(uri: str | os.PathLike[str]) -> list[str]:
    return Storage.from_uri(uri).list_files()


def put_dir(local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> Manifest:
    return Storage.from_uri(uri).put_dir(local_dir)


def get_dir(
    uri: str | os.PathLike[str], local_dir: str | os.PathLike[str], *, verify: bool = True
) -> Manifest:
    return Storage.from_uri(uri).get_dir(local_dir, verify=verify)


def verify(uri: str | os.PathLike[str]) -> Manifest:
    return Storage.from_uri(uri).verify()


def local_copy(uri: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Storage.from_uri(uri).local_copy(cache_dir=cache_dir)


# --- model folders for serving -------------------------------------------------------------------------------

# KServe's storage-initializer folder (kserve.model_repository.MODEL_MOUNT_DIRS, a test checks they agree):
# a constant here, so that finding a model does not import KServe.
MODEL_MOUNT_DIRS = "/mnt/models"
MODEL_FILES = ("config.json",)


class ModelLocationError(ValueError):
    pass


def _model_folder(root: Path) -> Path:
    """The folder holding the model files: `root`, or its single subfolder that does (storage-initializer)."""
    if any((root / name).is_file() for name in MODEL_FILES):
        return root
    children = [d for d in root.iterdir() if d.is_dir() and any((d / n).is_file() for n in MODEL_FILES)]
    if len(children) == 1:
        return children[0]
    raise ModelLocationError(
        f"{root} holds no model: expected {', '.join(MODEL_FILES)} in it or in exactly one subfolder"
    )


def resolve_model(model: str | None, *, mount: str = MODEL_MOUNT_DIRS) -> Path:
    """A local model folder from a local path, an s3:// / minio:// URI (copied once, cached), or /mnt/models."""
    if model is None:
        root = Path(mount)
        if not root.is_dir():
            raise ModelLocationError(
                f"no --model given and {mount} (KServe's storage-initializer folder) does not exist"
            )
        return _model_folder(root)
    if model.startswith(("s3://", "minio://")):
        return _model_folder(local_copy(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLocationError(f"model folder {path} does not exist")
    return _model_folder(path)
