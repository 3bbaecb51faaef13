"""teleguard.storage against local folders and a real S3 server (moto) on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio.error import S3Error

from teleguard import storage
from teleguard.storage import (
    MANIFEST_NAME,
    ChecksumError,
    LocalLocation,
    LocalStorage,
    S3Config,
    S3Location,
    S3Storage,
    Storage,
    StorageConfigError,
    StorageError,
    parse_uri,
)

ACCESS_KEY = "AKIATELEGUARDTESTKEY7"
SECRET_KEY = "tg-secret/Zq8+never-print-me-91c4"
SESSION_TOKEN = "tg-session-token-5e1d0c"
STORAGE_VARS = (
    *storage.ENDPOINT_VARS,
    *(name for pair in storage.KEY_PAIRS for name in pair),
    *storage.REGION_VARS,
    storage.SESSION_TOKEN_VAR,
    storage.CACHE_DIR_ENV,
)
BIG_SIZE = 6 * 1024 * 1024 + 123  # above minio's 5 MiB part size: a two-part multipart upload


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in STORAGE_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def s3_env(clean_env: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    clean_env.setenv("S3_ENDPOINT", s3_endpoint)
    clean_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    clean_env.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    clean_env.setenv("AWS_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def bucket() -> str:
    return f"tg-{uuid.uuid4().hex[:12]}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"lr": 1e-5}\n',
        "empty.txt": b"",
        "nested/deep/data.txt": b"call transcript " * 64,
        "nested/weights.bin": os.urandom(BIG_SIZE),
        "reports/\u62a5\u544a.md": "\u8bc8\u9a97\u7387 3%\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class Target:
    """A stored folder plus ways to tamper with it behind the storage layer's back."""

    kind: str
    uri: str
    store: Storage
    overwrite: Callable[[str, bytes], None]
    remove: Callable[[str], None]


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path, bucket: str) -> Target:
    if request.param == "local":
        root = tmp_path / "store" / "run1"
        return Target(
            "local",
            str(root),
            Storage.from_uri(root.as_uri()),  # file:// form; plain paths are covered elsewhere
            lambda rel, data: (root / rel).write_bytes(data),
            lambda rel: (root / rel).unlink(),
        )
    request.getfixturevalue("s3_env")
    uri = f"minio://{bucket}/runs/run1"
    store = Storage.from_uri(uri)
    assert isinstance(store, S3Storage)
    client = store.client
    return Target(
        "s3",
        uri,
        store,
        lambda rel, data: client.put_object(bucket, f"runs/run1/{rel}", io.BytesIO(data), len(data)),
        lambda rel: client.remove_object(bucket, f"runs/run1/{rel}"),
    )


# --------------------------------------------------------------------------------------------- URIs


def test_parse_uri_forms(tmp_path: Path) -> None:
    assert parse_uri(str(tmp_path)) == LocalLocation(tmp_path)
    assert parse_uri(tmp_path) == LocalLocation(tmp_path)
    assert parse_uri("file:///data/sets/x%20y") == LocalLocation(Path("/data/sets/x y"))
    assert parse_uri("file://localhost/data") == LocalLocation(Path("/data"))
    assert parse_uri("run:1") == LocalLocation(Path("run:1"))  # a colon in a file name is not a scheme
    assert parse_uri("s3://ckpt/runs/a/") == S3Location("ckpt", "runs/a")
    assert parse_uri("minio://ckpt/runs/a") == parse_uri("s3://ckpt/runs/a")
    assert parse_uri("s3://ckpt") == S3Location("ckpt", "")
    assert parse_uri("S3://ckpt/x").uri == "s3://ckpt/x"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "empty"),
        ("s3://", "missing bucket"),
        ("s3:///prefix", "missing bucket"),
        ("s3://Checkpoints/x", "must be lowercase"),
        ("s3://ab/x", "is not valid"),
        ("s3://bad_bucket/x", "is not valid"),
        ("s3://bucket//x", "empty path segment"),
        ("minio://bucket/a/../b", "'..'"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("s3:/bucket/x", "must be followed by '//'"),
        ("file://otherhost/data", "take no host"),
    ],
)
def test_malformed_uri(uri: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid storage URI") as info:
        parse_uri(uri)
    assert reason in str(info.value)
    assert repr(uri) in str(info.value)


@pytest.mark.parametrize("userinfo", [f"{ACCESS_KEY}:{SECRET_KEY}", ACCESS_KEY, f"{ACCESS_KEY}:plain"])
def test_uri_with_credentials_is_refused_without_echoing_them(userinfo: str) -> None:
    with pytest.raises(ValueError, match="credentials do not belong in the URI") as info:
        parse_uri(f"s3://{userinfo}@bucket/x")
    for part in (SECRET_KEY, ACCESS_KEY, *SECRET_KEY.split("/")):  # SECRET_KEY holds a '/' on purpose
        assert part not in str(info.value)
    assert "***@bucket/x" in str(info.value)


def test_bad_relative_keys_are_refused(tmp_path: Path) -> None:
    store = Storage.from_uri(tmp_path)
    for key in ("../outside.txt", "/etc/passwd", "a//b"):
        with pytest.raises(ValueError, match="invalid key"):
            store.write_bytes(key, b"x")
    assert not (tmp_path.parent / "outside.txt").exists()


# ------------------------------------------------------------------------------------------- config


def test_missing_endpoint(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with pytest.raises(StorageConfigError, match="S3_ENDPOINT or AWS_ENDPOINT_URL") as info:
        Storage.from_uri("s3://bucket/x")
    assert "s3://bucket/x" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_credentials(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Storage.from_uri("s3://bucket/x")
    clean_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # half a pair names the missing half
    with pytest.raises(StorageConfigError, match="AWS_SECRET_ACCESS_KEY is not set") as info:
        Storage.from_uri("s3://bucket/x")
    assert ACCESS_KEY not in str(info.value)


def test_minio_credential_names_and_endpoint_scheme(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MINIO_ACCESS_KEY", ACCESS_KEY)
    clean_env.setenv("MINIO_SECRET_KEY", SECRET_KEY)
    clean_env.setenv("AWS_ENDPOINT_URL", "https://minio.minio.svc:9000")
    clean_env.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)  # belongs to the AWS pair, not to MinIO keys
    config = S3Config.from_env()
    assert (config.endpoint, config.secure, config.region) == ("minio.minio.svc:9000", True, None)
    assert (config.access_key, config.secret_key, config.session_token) == (ACCESS_KEY, SECRET_KEY, None)
    clean_env.setenv("S3_ENDPOINT", "http://127.0.0.1:9000")  # S3_ENDPOINT wins
    assert S3Config.from_env().secure is False


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("127.0.0.1:9000", "must start with http:// or https://"),
        ("ftp://127.0.0.1:9000", "must start with http:// or https://"),
        ("http://127.0.0.1:9000/minio", "no path"),
        ("http://127.0.0.1:notaport", "invalid port"),
        (f"http://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:9000", "must not embed credentials"),
    ],
)
def test_bad_endpoint(clean_env: pytest.MonkeyPatch, endpoint: str, reason: str) -> None:
    clean_env.setenv("S3_ENDPOINT", endpoint)
    clean_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with pytest.raises(StorageConfigError, match="S3_ENDPOINT=") as info:
        Storage.from_uri("s3://bucket/x")
    assert reason in str(info.value)
    assert SECRET_KEY not in str(info.value)


# ------------------------------------------------------------------------------------------ secrets


def test_secrets_stay_out_of_reprs_errors_and_logs(
    s3_env: str, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 included
    store = Storage.from_uri(f"s3://{bucket}/run")
    assert isinstance(store, S3Storage)
    texts = [repr(store), str(store), repr(store.config), str(store.config)]
    assert store.config.secret_key == SECRET_KEY  # the secret is there, just never shown

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    store.put_dir(tmp_path / "src")
    store.get_dir(tmp_path / "dst")
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes("nope.txt")
    texts.append(str(missing.value))

    # A server error whose text echoes credentials (as a signature-mismatch reply can) is scrubbed.
    def leaky_get_object(*args: object, **kwargs: object) -> None:
        raise S3Error(None, "SignatureDoesNotMatch", f"creds {ACCESS_KEY}/{SECRET_KEY} x", "/", "r", "h")  # type: ignore[arg-type]

    store.client.get_object = leaky_get_object  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="SignatureDoesNotMatch") as leaky:
        store.read_bytes("a.txt")
    assert "creds ***/*** x" in str(leaky.value)
    assert leaky.value.__cause__ is None and leaky.value.__suppress_context__
    texts += [str(leaky.value), repr(leaky.value)]

    texts.append(caplog.text)
    assert "put_dir" in caplog.text  # the logs were captured, so checking them means something
    for text in texts:
        for secret in (SECRET_KEY, ACCESS_KEY, SESSION_TOKEN):
            assert secret not in text


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_with_checksums(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    (src / MANIFEST_NAME).write_text("stale, replaced by put_dir")

    manifest = target.store.put_dir(src)
    assert {f.path: (f.size, f.sha256) for f in manifest.files} == {
        rel: (len(data), sha(data)) for rel, data in files.items()
    }
    assert sorted(target.store.list_files()) == sorted([*files, MANIFEST_NAME])
    stored = json.loads(target.store.read_bytes(MANIFEST_NAME))
    assert {f["path"]: f["sha256"] for f in stored["files"]} == {rel: sha(d) for rel, d in files.items()}
    assert target.store.list_files("nested") == ["deep/data.txt", "weights.bin"]
    assert target.store.exists("nested") and target.store.exists("config.json")
    assert not target.store.exists("nested/nothing")

    if isinstance(target.store, S3Storage):  # the big file really went up in parts
        stat = target.store.client.stat_object(target.store.location.bucket, "runs/run1/nested/weights.bin")
        assert stat.etag.endswith("-2"), stat.etag

    dst = tmp_path / "dst"
    assert storage.get_dir(target.uri, dst) == manifest
    got = read_tree(dst)
    assert json.loads(got.pop(MANIFEST_NAME)) == json.loads(manifest.to_json())
    assert got == files
    assert storage.verify(target.uri) == manifest

    # Resuming into the same folder re-fetches only what is wrong locally.
    (dst / "nested" / "deep" / "data.txt").write_bytes(b"local damage")
    target.store.get_dir(dst)
    assert (dst / "nested" / "deep" / "data.txt").read_bytes() == files["nested/deep/data.txt"]


def test_corrupted_object_is_detected(target: Target, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    target.store.put_dir(tmp_path / "src")
    rel = "nested/deep/data.txt"
    bad = files[rel].replace(b"call", b"CALL")  # same size, different bytes
    target.overwrite(rel, bad)

    with pytest.raises(ChecksumError) as got:
        target.store.get_dir(tmp_path / "dst")
    message = str(got.value)
    assert repr(rel) in message
    assert sha(files[rel]) in message and sha(bad) in message
    assert [(p.path, p.expected_sha256, p.actual_sha256) for p in got.value.problems] == [
        (rel, sha(files[rel]), sha(bad))
    ]
    assert not (tmp_path / "dst" / rel).exists()  # the bad copy is not left where a reader would use it
    assert (tmp_path / "dst" / "config.json").read_bytes() == files["config.json"]

    with pytest.raises(ChecksumError, match=r"1 of 5 file\(s\) failed") as again:
        storage.verify(target.uri)
    assert repr(rel) in str(again.value) and sha(bad) in str(again.value)


def test_missing_object_is_detected(target: Target, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    target.store.put_dir(tmp_path / "src")
    target.remove("nested/weights.bin")

    with pytest.raises(ChecksumError, match=r"'nested/weights.bin': missing") as got:
        target.store.verify()
    assert got.value.problems[0].actual_sha256 is None
    with pytest.raises(ChecksumError, match=r"'nested/weights.bin': missing"):
        target.store.get_dir(tmp_path / "dst")


def test_folder_without_manifest(target: Target, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing stored"):
        target.store.get_dir(tmp_path / "dst")
    target.store.write_bytes("raw/a.txt", b"a")
    target.store.write_bytes("raw/b/c.txt", b"c")
    with pytest.raises(ChecksumError, match=r"has no manifest\.json"):
        target.store.verify("raw")
    unverified = target.store.get_dir(tmp_path / "dst", "raw", verify=False)
    assert [f.path for f in unverified.files] == ["a.txt", "b/c.txt"]
    assert read_tree(tmp_path / "dst") == {"a.txt": b"a", "b/c.txt": b"c"}


def test_manifest_cannot_escape_the_destination(target: Target, tmp_path: Path) -> None:
    evil = {
        "version": 1,
        "algorithm": "sha256",
        "files": [{"path": "../evil.txt", "size": 1, "sha256": "0" * 64}],
    }
    target.store.write_bytes(MANIFEST_NAME, json.dumps(evil).encode())
    with pytest.raises(ChecksumError, match=r"manifest.json is not a valid manifest: .*'\.\.' segments"):
        target.store.get_dir(tmp_path / "dst" / "inner")
    assert not (tmp_path / "dst" / "evil.txt").exists()


# ----------------------------------------------------------------------------- bytes, buckets, caches


def test_bytes_and_bucket_creation(s3_env: str, bucket: str, tmp_path: Path) -> None:
    store = Storage.from_uri(f"s3://{bucket}/reports")
    assert isinstance(store, S3Storage)
    assert not store.client.bucket_exists(bucket)
    assert not store.exists() and store.list_files() == []
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/reports/eval.json"):
        store.read_bytes("eval.json")

    storage.write_bytes(f"s3://{bucket}/reports/eval.json", b'{"f1": 0.91}')  # creates the bucket
    assert store.client.bucket_exists(bucket)
    assert storage.read_bytes(f"s3://{bucket}/reports/eval.json") == b'{"f1": 0.91}'
    assert storage.exists(f"s3://{bucket}/reports") and not storage.exists(f"s3://{bucket}/other")
    assert storage.list_files(f"s3://{bucket}") == ["reports/eval.json"]
    with pytest.raises(ValueError, match="names a bucket, not an object"):
        storage.read_bytes(f"s3://{bucket}")


def test_local_copy_is_the_path_itself_when_local(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert storage.local_copy(str(tmp_path / "data.jsonl")) == tmp_path / "data.jsonl"
    assert isinstance(Storage.from_uri(tmp_path), LocalStorage)
    with pytest.raises(FileNotFoundError):
        storage.local_copy(str(tmp_path / "absent"))


def test_local_copy_caches_remote_files_and_folders(s3_env: str, bucket: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = make_tree(tmp_path / "src")
    store = Storage.from_uri(f"s3://{bucket}/ds")
    store.put_dir(tmp_path / "src")

    folder = store.local_copy(cache_dir=cache)
    assert folder.is_relative_to(cache) and folder.name == "ds"
    got = read_tree(folder)
    got.pop(MANIFEST_NAME)
    assert got == files

    one = storage.local_copy(f"s3://{bucket}/ds/config.json", cache_dir=cache)
    assert one == folder / "config.json" and one.read_bytes() == files["config.json"]
    store.write_bytes("config.json", b'{"lr": 2e-5}\n')  # a new ETag means a new download
    assert store.local_copy("config.json", cache_dir=cache).read_bytes() == b'{"lr": 2e-5}\n'

    (folder / "stale.tmp").write_text("left over")
    store.put_dir(tmp_path / "src")  # the folder is rewritten: the cache follows the manifest
    again = store.local_copy(cache_dir=cache)
    assert not (again / "stale.tmp").exists()
    assert (again / "config.json").read_bytes() == files["config.json"]
    with pytest.raises(FileNotFoundError):
        store.local_copy("absent", cache_dir=cache)
