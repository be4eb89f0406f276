"""The job-store interface both stores implement: :class:`~trtquant.service.store.JobStore`
(SQLite, embedded mode) and :class:`~trtquant.service.pg_store.PgJobStore` (Postgres,
scale-out mode).

It is what the build code relies on — create with dedupe, claim with a lease, succeed/fail
settling the waiters, lease renewal and expiry, the artifact index and eviction — so a
worker or the artifact store works against either. Scale-out extras (submissions, worker
registry, requeueing) are on :class:`PgJobStore` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from trtquant.service.store import ArtifactRecord, Job

__all__ = ["JobIndex"]


@runtime_checkable
class JobIndex(Protocol):
    """Jobs and the artifact index (see :class:`~trtquant.service.store.JobStore` for each method)."""

    lease_s: float
    owner: str

    def close(self) -> None: ...

    def create_job(self, *, job_id: str, key: str, options: Mapping[str, Any], inputs: Mapping[str, Any],
                   onnx_sha256: str, onnx_bytes: int, filename: str | None, backend: str, backend_version: str,
                   device: str | None, check_report: Mapping[str, Any] | None,
                   artifact_ok: Callable[[ArtifactRecord], bool]) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def claim(self, job_id: str, *, owner: str | None = None, lease_s: float | None = None) -> Job | None: ...

    def succeed(self, job_id: str, artifact: ArtifactRecord, log: str, *, built: bool = True) -> bool: ...

    def succeed_from_cache(self, job_id: str, artifact: ArtifactRecord, log: str) -> None: ...

    def fail(self, job_id: str, error: str, log: str | None) -> bool: ...

    def renew_leases(self, job_ids: list[str] | set[str], owner: str, lease_s: float) -> set[str]: ...

    def expire_leases(self, now: float | None = None) -> list[str]: ...

    def recover(self) -> dict[str, int]: ...

    def queued_builds(self) -> list[str]: ...

    def counts(self) -> dict[str, int]: ...

    def artifact(self, key: str) -> ArtifactRecord | None: ...

    def artifacts(self) -> dict[str, str]: ...

    def forget_artifact(self, key: str) -> None: ...

    def touch_artifact(self, key: str, now: float | None = None) -> None: ...

    def cache_bytes(self) -> int: ...

    def evict_artifacts(self, *, max_bytes: int | None, max_age_s: float | None,
                        keep: set[str] | frozenset[str] = frozenset(), now: float | None = None) -> list[tuple[str, str]]: ...
