"""Where a pull repository lives: one small interface over a local folder and any S3 object store.

A TUF repository is static files, so the backend only needs put / get / list / delete. The
folder backend is also what an HTTP server (nginx, a CDN origin) serves; the S3 backend talks
to AWS S3, GCS (interoperability mode), R2, MinIO or SeaweedFS through boto3 (the ``host``
extra), which signs requests with the usual AWS credential chain (``AWS_ACCESS_KEY_ID``,
profiles, ``AWS_ENDPOINT_URL`` for a non-AWS endpoint).

Specs: ``DIR`` or ``file:///DIR`` -> folder; ``s3://BUCKET[/PREFIX]`` -> S3 (``?endpoint=URL``
or ``$AWS_ENDPOINT_URL`` chooses the server). New kinds register in ``BACKENDS``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Protocol
from urllib.parse import parse_qs, urlparse

from device_agent.durable import atomic_write, commit_file, temp_path

from .errors import FleetError, InventoryError


class StorageError(FleetError):
    """The repository store refused or failed an operation (permissions, network, missing bucket)."""

    exit_code = 20


class Backend(Protocol):
    """The whole storage interface a repository needs. Keys are ``/``-separated relative paths."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None: ...
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str, start_after: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def describe(self) -> str: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InventoryError(f"repository key {key!r} is not a plain relative path")
    return key


class FolderBackend:
    """A local folder (what nginx or a CDN origin serves). Every write is temp file + fsync +
    rename, so a reader (a board polling through the web server) sees an old or a new file,
    never half of one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, data)
        os.chmod(p, 0o644)  # served to anonymous readers by the web server

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(p)
        shutil.copyfile(path, tmp)
        os.chmod(tmp, 0o644)
        commit_file(tmp, p)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and ".tmp-" not in p.name)
        return iter([k for k in keys if k > start_after])

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def describe(self) -> str:
        return f"folder {self.root}"


class S3Backend:
    """Any S3-compatible store through boto3. Objects are written with one PUT each (S3 PUTs are
    atomic per object), which is all the repository's publish order needs."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise InventoryError("the S3 backend needs boto3: pip install 'edgepack[host]'") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url,
                                   region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
                                   config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                 connect_timeout=10, read_timeout=60,
                                                 s3={"addressing_style": "path"}))
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors = (BotoCoreError, ClientError)

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, op: str, key: str, e: Exception) -> StorageError:
        return StorageError(f"S3 {op} s3://{self.bucket}/{self._k(key)} failed: {e}; check the bucket, the "
                            f"credentials and the endpoint ({self.endpoint_url or 'AWS'})")

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except self._errors as e:
                raise self._fail("create bucket", "x", e) from None

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ContentType=content_type)
        except self._errors as e:
            raise self._fail("PUT", key, e) from None

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        try:
            with open(path, "rb") as f:
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=f, ContentType=content_type)
        except self._errors as e:
            raise self._fail("PUT", key, e) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self._errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail("GET", key, e) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except self._errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail("HEAD", key, e) from None

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        full = self._k(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        kw = {"Bucket": self.bucket, "Prefix": full}
        if start_after:
            kw["StartAfter"] = self._k(start_after)
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                for o in page.get("Contents", []):
                    yield o["Key"][cut:]
        except self._errors as e:
            raise self._fail("LIST", prefix or "x", e) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except self._errors as e:
            raise self._fail("DELETE", key, e) from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"


def _folder(u, spec: str) -> FolderBackend:
    return FolderBackend(u.path if u.scheme == "file" else spec)


def _s3(u, spec: str) -> S3Backend:
    q = parse_qs(u.query)
    if not u.netloc:
        raise InventoryError(f"{spec}: an S3 repository is s3://BUCKET[/PREFIX][?endpoint=URL]")
    return S3Backend(u.netloc, u.path, endpoint_url=(q.get("endpoint") or [None])[0], region=(q.get("region") or [None])[0])


BACKENDS: dict[str, Callable[..., Backend]] = {"": _folder, "file": _folder, "s3": _s3}


def open_backend(spec: str | Path) -> Backend:
    """A backend from ``DIR``, ``file:///DIR`` or ``s3://BUCKET/PREFIX?endpoint=URL``."""
    s = str(spec)
    u = urlparse(s)
    scheme = u.scheme if len(u.scheme) > 1 else ""  # a Windows drive letter is not a scheme
    fn = BACKENDS.get(scheme)
    if fn is None:
        raise InventoryError(f"repository {s!r}: unknown scheme {scheme!r}; use a folder, file:// or "
                             f"s3://BUCKET/PREFIX (serve a folder over HTTP with any web server)")
    return fn(u, s)


__all__ = ["Backend", "FolderBackend", "S3Backend", "StorageError", "open_backend", "BACKENDS"]
