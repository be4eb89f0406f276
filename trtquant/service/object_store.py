"""Artifacts and uploads of scale-out mode in an S3-compatible object store (the option beside
the shared folder).

``--artifact-url s3://bucket[/prefix]`` on API nodes and workers replaces the mounted shared
volume: every node keeps only a local work folder (scratch, downloads being served), and the
bucket holds::

    <prefix>cache/<key[:2]>/<key><ext>   published artifacts, one per cache key
    <prefix>uploads/<job id>.onnx       uploads of queued builds (deleted when the build ends)

The shared folder's guarantees carry over:

* **atomic publish**: an object becomes visible only once its upload (single or multipart)
  completed, so a reader never sees half an artifact; S3 checks the upload's SHA-256
  (``ChecksumAlgorithm="SHA256"``) and the object carries our sha256 in its metadata;
* **verified serving**: the API node downloads to a private temp file, checks the recorded
  sha256 before sending a byte, and removes the object and its row on a mismatch;
* **one eviction policy**: :meth:`ArtifactStore.evict` picks the victims from the job store's
  index (pinned keys and artifacts of unfinished jobs are kept) and deletes their objects;
* **nothing leaks**: uploads are deleted when the build ends, and the watchdog's sweep removes
  those whose job is final or unknown (an API node that died mid-submission).

Endpoint and credentials come from boto3's standard chain (``$AWS_ENDPOINT_URL`` or
``$AWS_ENDPOINT_URL_S3`` for MinIO/Ceph/moto, ``$AWS_ACCESS_KEY_ID``, instance roles ...);
nothing secret is passed on the command line. Read-after-write consistency is what AWS S3
has offered since December 2020 and what MinIO and Ceph RGW provide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtquant.service.store import ArtifactRecord, ArtifactStore, is_job_id, sha256_file

__all__ = ["S3ArtifactStore", "open_artifact_store", "parse_artifact_url"]

_LOG = logging.getLogger("trtquant.service")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._/-]*$")
_SERVE_PREFIX = ".serve-"


def parse_artifact_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix ending in ``/`` or empty); ValueError naming the problem."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "s3":
        raise ValueError(f"--artifact-url {url!r}: expected s3://bucket[/prefix] (an S3-compatible object store; "
                         "for a mounted volume use --shared-dir)")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"--artifact-url {url!r}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    prefix = prefix.strip("/")
    if not _PREFIX.match(prefix) or ".." in prefix.split("/"):
        raise ValueError(f"--artifact-url {url!r}: the prefix may hold only letters, digits, '.', '_', '-' and '/'")
    return bucket, f"{prefix}/" if prefix else ""


def open_artifact_store(workdir: Path, artifact_url: str | None, *, cache_max_bytes: int | None,
                        cache_max_age_s: float | None, client: Any = None) -> ArtifactStore:
    """The shared folder ``workdir``, or the bucket of ``artifact_url`` with ``workdir`` as local work folder."""
    if not artifact_url:
        return ArtifactStore(workdir, cache_max_bytes=cache_max_bytes, cache_max_age_s=cache_max_age_s)
    return S3ArtifactStore(artifact_url, workdir, cache_max_bytes=cache_max_bytes, cache_max_age_s=cache_max_age_s,
                           client=client)


def _is_missing(exc: Exception) -> bool:
    """A ClientError that means 'no such object'."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3ArtifactStore(ArtifactStore):
    """:class:`~trtquant.service.store.ArtifactStore` whose artifacts and shared uploads are objects.

    Args:
        url: ``s3://bucket[/prefix]``.
        workdir: this node's own work folder (scratch folders, uploads being received or built,
            downloads being served); not shared.
        cache_max_bytes, cache_max_age_s: as for the folder store (applied by :meth:`evict`).
        client: a boto3 S3 client (default: ``boto3.client("s3")`` with retries and timeouts).
    """

    def __init__(self, url: str, workdir: str | os.PathLike[str], *, cache_max_bytes: int | None = None,
                 cache_max_age_s: float | None = None, client: Any = None) -> None:
        super().__init__(workdir, cache_max_bytes=cache_max_bytes, cache_max_age_s=cache_max_age_s)
        self.bucket, self.prefix = parse_artifact_url(url)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise RuntimeError("--artifact-url s3://... needs boto3: pip install 'trtquant[s3]'") from exc
            client = boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5},
                                                      connect_timeout=10, read_timeout=120))
        self.client = client
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors as exc:
            raise RuntimeError(f"artifact store s3://{self.bucket}/{self.prefix} is not usable: {exc} (check the "
                               "bucket, $AWS_ENDPOINT_URL and the credentials)") from None

    def describe(self) -> str:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return f"bucket s3://{self.bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")

    # object names are only ever derived from validated hex keys/ids and fixed suffixes
    def object_name(self, key: str, suffix: str) -> str:
        path = self.path_for(key, suffix)  # validates
        return f"{self.prefix}cache/{key[:2]}/{path.name}"

    def upload_object(self, job_id: str) -> str:
        return f"{self.prefix}uploads/{self.upload_path(job_id).name}"

    def _put(self, src: Path, name: str, sha: str) -> None:
        """Upload ``src`` as ``name``; S3 verifies its SHA-256 and the object appears only when complete."""
        self.client.upload_file(str(src), self.bucket, name,
                                ExtraArgs={"Metadata": {"sha256": sha}, "ChecksumAlgorithm": "SHA256"})

    def _get(self, name: str, dst: Path) -> bool:
        """Download ``name`` to ``dst`` (via a temp file beside it); False when there is no such object."""
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.client.download_file(self.bucket, name, str(tmp))
            os.replace(tmp, dst)
            return True
        except self._errors as exc:
            if _is_missing(exc):
                return False
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = names[start:start + 1000]
            try:
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": n} for n in chunk], "Quiet": True})
            except self._errors as exc:
                _LOG.warning("could not delete %d object(s) from %s: %s", len(chunk), self.describe(), exc)

    # ------------------------------------------------------------------ artifacts

    def publish(self, key: str, src: Path, suffix: str) -> tuple[Path, str, int]:
        """Upload a finished artifact; returns ``(src, sha256, size)`` (``src`` stays in the build's
        scratch folder, which the worker removes)."""
        name = self.object_name(key, suffix)
        sha, size = sha256_file(src)
        with self._cache_lock:
            self._put(src, name, sha)
        return src, sha, size

    def is_complete(self, record: ArtifactRecord) -> bool:
        """The object exists with the recorded size."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_name(record.key, record.suffix))
        except ValueError:
            return False
        except self._errors as exc:
            if not _is_missing(exc):
                _LOG.warning("artifact store %s: HEAD %s failed: %s", self.describe(), record.key, exc)
            return False
        return int(head.get("ContentLength", -1)) == record.bytes

    def local_copy(self, record: ArtifactRecord) -> Path:
        """Download the object to a private temp file (FileNotFoundError when it is gone)."""
        dst = self.tmp / f"{_SERVE_PREFIX}{uuid.uuid4().hex}{record.suffix}"
        if not self._get(self.object_name(record.key, record.suffix), dst):
            raise FileNotFoundError(record.key)
        return dst

    def release_local(self, path: Path) -> None:
        """Delete a served temp copy (an open handle keeps reading it)."""
        if path.parent == self.tmp and path.name.startswith(_SERVE_PREFIX):
            path.unlink(missing_ok=True)

    def discard(self, key: str, suffix: str) -> None:
        self._delete([self.object_name(key, suffix)])

    def _remove_evicted(self, victims: list[tuple[str, str]]) -> None:
        self._delete([self.object_name(key, suffix) for key, suffix in victims])

    # ------------------------------------------------------------------ uploads

    def share_upload(self, src: Path, job_id: str) -> None:
        sha, _ = sha256_file(src)
        self._put(src, self.upload_object(job_id), sha)

    def fetch_upload(self, job_id: str) -> Path | None:
        local = self.upload_path(job_id)
        if local.is_file():
            return local
        return local if self._get(self.upload_object(job_id), local) else None

    def drop_upload(self, job_id: str) -> None:
        super().drop_upload(job_id)
        with contextlib.suppress(ValueError):
            self._delete([self.upload_object(job_id)])

    def sweep_shared_uploads(self, unneeded: Callable[[str], bool], min_age_s: float) -> list[str]:
        """Delete upload objects older than ``min_age_s`` whose job ``unneeded`` says is over, and
        this node's served temp copies left by a crash."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.startswith(_SERVE_PREFIX) and now - entry.stat().st_mtime > min_age_s:
                        entry.unlink()
        stale: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}uploads/"):
            for item in page.get("Contents", []):
                name = str(item["Key"]).rsplit("/", 1)[-1]
                job_id = name.removesuffix(".onnx")
                age = now - item["LastModified"].timestamp()
                if age >= min_age_s and (not is_job_id(job_id) or unneeded(job_id)):
                    stale.append(str(item["Key"]))
        self._delete(stale)
        return [name.rsplit("/", 1)[-1] for name in stale]
