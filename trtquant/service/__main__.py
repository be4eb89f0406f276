"""``python -m trtquant.service``: run the engine-build service with uvicorn.

``trtquant serve`` calls :func:`serve` with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TOKEN_ENV", "add_limit_arguments", "add_scale_out_arguments", "limits_from_args", "main",
           "scale_out_from_args", "serve"]

DEFAULT_TOKEN_ENV = "TRTQUANT_SERVICE_TOKEN"
DEFAULT_WORKDIR = "trtquant-service"

_LOG = logging.getLogger("trtquant.service")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The service's resource limits as flags (``trtquant serve`` and ``python -m trtquant.service`` share them)."""
    parser.add_argument("--upload-timeout-s", type=float, default=60.0,
                        help="longest wait for the next chunk of an upload, then 408 (default 60)")
    parser.add_argument("--max-tensor-elements", type=int, default=1 << 26,
                        help="largest tensor a model may declare, checked before building (default 2^26), 413 above")
    parser.add_argument("--max-graph-gb", type=float, default=4.0,
                        help="total size of a model's declared tensors in GiB (default 4), 413 above")
    parser.add_argument("--cache-max-gb", type=float, default=10.0,
                        help="artifact cache size in GiB before least-recently-used eviction (default 10; 0: no limit)")
    parser.add_argument("--cache-max-age-days", type=float, default=30.0,
                        help="evict artifacts unused this long (default 30; 0: never)")
    parser.add_argument("--lease-s", type=float, default=60.0,
                        help="a running build's lease; a build whose thread or process is gone fails after it (default 60)")


def limits_from_args(args: argparse.Namespace) -> dict[str, object]:
    """:func:`add_limit_arguments`' flags as :class:`~trtquant.service.app.ServiceConfig` fields."""
    for flag in ("upload_timeout_s", "max_tensor_elements", "max_graph_gb", "lease_s"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("cache_max_gb", "cache_max_age_days"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: no limit), got {getattr(args, flag)}")
    return {
        "upload_read_timeout_s": float(args.upload_timeout_s),
        "max_tensor_elements": int(args.max_tensor_elements),
        "max_graph_bytes": int(args.max_graph_gb * (1 << 30)),
        "cache_max_bytes": int(args.cache_max_gb * (1 << 30)) or None,
        "cache_max_age_s": float(args.cache_max_age_days) * 86400.0 or None,
        "lease_s": float(args.lease_s),
    }


def add_scale_out_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of scale-out mode (``trtquant serve --scale-out`` and ``python -m trtquant.service``)."""
    group = parser.add_argument_group("scale-out mode (API node; builds run on `trtquant worker` processes)")
    group.add_argument("--scale-out", action="store_true",
                       help="stateless API node: jobs in Postgres, builds on Celery workers per GPU kind")
    group.add_argument("--database-url", default=None, help="Postgres URL (or $TRTQUANT_SERVICE_DATABASE_URL)")
    group.add_argument("--broker-url", default=None, help="Celery broker, redis://... (or $TRTQUANT_SERVICE_BROKER_URL)")
    group.add_argument("--shared-dir", default=None,
                       help="artifact folder shared with the workers (or $TRTQUANT_SERVICE_SHARED_DIR; default --workdir)")
    group.add_argument("--artifact-url", default=None,
                       help="s3://bucket[/prefix]: artifacts and uploads in an S3-compatible object store instead of "
                            "--shared-dir (or $TRTQUANT_SERVICE_ARTIFACT_URL; endpoint and credentials from the "
                            "standard AWS variables, e.g. $AWS_ENDPOINT_URL; needs trtquant[s3])")
    group.add_argument("--key-prefix", default=None, help="Redis key prefix (or $TRTQUANT_SERVICE_KEY_PREFIX)")
    group.add_argument("--worker-ttl-s", type=float, default=15.0, help="a worker silent this long is offline (default 15)")
    group.add_argument("--no-worker-grace-s", type=float, default=60.0,
                       help="a queued build of a kind without workers fails after this (default 60)")
    group.add_argument("--max-attempts", type=int, default=3, help="claims of a build before a lost worker fails it")
    group.add_argument("--watchdog-s", type=float, default=None, help="watchdog period (default lease/4, 0.5-5 s)")
    group.add_argument("--log-format", choices=("text", "json"), default=None,
                       help="log lines as text or JSON objects (default: json in scale-out mode)")


def scale_out_from_args(args: argparse.Namespace) -> dict[str, object]:
    """:func:`add_scale_out_arguments`' flags (and their environment variables) as ServiceConfig fields."""
    if not getattr(args, "scale_out", False):
        return {}
    from trtquant.settings import env_value

    fields: dict[str, object] = {
        "scale_out": True,
        "database_url": args.database_url or env_value("TRTQUANT_SERVICE_DATABASE_URL"),
        "broker_url": args.broker_url or env_value("TRTQUANT_SERVICE_BROKER_URL"),
        "redis_key_prefix": args.key_prefix or env_value("TRTQUANT_SERVICE_KEY_PREFIX"),
        "worker_ttl_s": float(args.worker_ttl_s), "no_worker_grace_s": float(args.no_worker_grace_s),
        "max_attempts": int(args.max_attempts), "watchdog_interval_s": args.watchdog_s,
    }
    shared = args.shared_dir or env_value("TRTQUANT_SERVICE_SHARED_DIR")
    if shared:
        fields["shared_dir"] = Path(shared)
    artifact_url = args.artifact_url or env_value("TRTQUANT_SERVICE_ARTIFACT_URL")
    if artifact_url:
        from trtquant.service.object_store import parse_artifact_url

        parse_artifact_url(artifact_url)  # ValueError naming what is wrong
        fields["artifact_url"] = artifact_url
    missing = [name for name in ("database_url", "broker_url") if not fields[name]]
    if missing:
        raise ValueError(f"--scale-out needs {' and '.join('--' + m.replace('_', '-') for m in missing)} "
                         "(or $TRTQUANT_SERVICE_DATABASE_URL / $TRTQUANT_SERVICE_BROKER_URL)")
    if fields["max_attempts"] < 1 or fields["worker_ttl_s"] <= 0:  # type: ignore[operator]
        raise ValueError("--max-attempts must be >= 1 and --worker-ttl-s > 0")
    return fields


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.set_inheritable(True)
    return sock


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    db_path: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] = DEFAULT_WORKDIR,
    workers: int = 1,
    max_upload_mb: float = 512,
    token_env: str = DEFAULT_TOKEN_ENV,
    *,
    backend: str | None = None,
    log_level: str = "info",
    port_file: str | os.PathLike[str] | None = None,
    limits: dict[str, object] | None = None,
    log_format: str | None = None,
) -> None:
    """Run the build service in the foreground until SIGINT/SIGTERM.

    Args:
        host: address to listen on (``0.0.0.0`` in a container; default loopback only).
        port: TCP port; 0 picks a free one (written to ``port_file``).
        db_path: SQLite job database (default ``<workdir>/jobs.db``).
        workdir: uploads, scratch, artifact cache, timing caches.
        workers: build worker threads (1 per GPU is right).
        max_upload_mb: largest accepted upload in MiB (413 above).
        token_env: name of the environment variable holding the bearer token; auth is off
            when it is unset or empty.
        backend: ``auto`` (TensorRT when usable, else ONNX Runtime), ``tensorrt`` or ``onnxruntime``.
        log_level: uvicorn/service log level.
        port_file: write the bound port here once listening (for scripts and tests).
        limits: further :class:`~trtquant.service.app.ServiceConfig` fields (resource limits; see
            :func:`limits_from_args`).

    Raises:
        ImportError: the ``service`` extra (fastapi, uvicorn, python-multipart) is missing.
    """
    try:
        import uvicorn

        from trtquant.service.app import ServiceConfig, create_app
    except ImportError as exc:
        raise ImportError(f"the build service needs its extra: pip install 'trtquant[service]' ({exc})") from exc

    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb={max_upload_mb} must be > 0")
    level = getattr(logging, log_level.upper(), logging.INFO)
    scale_out = bool((limits or {}).get("scale_out"))
    if scale_out or log_format == "json":
        from trtquant.service.logs import configure_logging

        configure_logging(log_level, log_format or "json")
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trtquant.settings import env_value, get_settings

    if token_env == DEFAULT_TOKEN_ENV:
        secret = get_settings().service_token
        token = secret.get_secret_value().strip() or None if secret is not None else None
    else:  # a name chosen on the command line
        token = (env_value(token_env) or "").strip() or None
    if token is None:
        _LOG.warning("$%s is not set: the build API accepts requests without authentication", token_env)
    config = ServiceConfig.from_env(
        Path(workdir), db_path=None if db_path is None else Path(db_path), workers=int(workers),
        max_upload_bytes=int(float(max_upload_mb) * 1024 * 1024), token=token, backend=backend, **(limits or {}),
    )
    app = create_app(config)
    sock = _bind(host, int(port))
    bound = sock.getsockname()[1]
    if port_file is not None:
        from trtquant.calib_cache import atomic_write_bytes

        atomic_write_bytes(port_file, str(bound).encode())
    _LOG.info("listening on http://%s:%d (docs at /docs)", host if ":" not in host else f"[{host}]", bound)
    json_logs = scale_out or log_format == "json"
    extra: dict[str, Any] = {"log_config": None} if json_logs else {}  # uvicorn's records reach the root's JSON handler
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), access_log=level <= logging.DEBUG,
                                           timeout_graceful_shutdown=30, **extra))
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trtquant.service", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one, see --port-file)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="uploads, artifact cache, scratch (default ./%(default)s)")
    parser.add_argument("--db", dest="db_path", default=None, help="SQLite job database (default <workdir>/jobs.db)")
    parser.add_argument("--workers", type=int, default=1, help="build worker threads (default 1: one GPU)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest upload in MiB (default 512)")
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                        help="environment variable with the bearer token (default %(default)s; unset = no auth)")
    parser.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default=None,
                        help="build backend (default: $TRTQUANT_SERVICE_BACKEND or auto)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    add_limit_arguments(parser)
    add_scale_out_arguments(parser)
    args = parser.parse_args(argv)
    try:
        limits = {**limits_from_args(args), **scale_out_from_args(args)}
    except ValueError as e:
        parser.error(str(e))
    serve(args.host, args.port, args.db_path, args.workdir, args.workers, args.max_upload_mb, args.token_env,
          backend=args.backend, log_level=args.log_level, port_file=args.port_file, limits=limits,
          log_format=args.log_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
