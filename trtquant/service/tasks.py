"""The Celery side of scale-out mode: the app's settings and how a build is sent to its kind's queue.

Celery (with a Redis broker) is the task engine: one queue per GPU kind
(:func:`~trtquant.service.kinds.queue_name`), so a worker consumes only builds it can make.
Settings that make a build survive its worker:

* ``task_acks_late`` — a message is acknowledged after the task returns, not when received;
* ``task_reject_on_worker_lost`` — a prefork child killed mid-task puts its message back;
* ``worker_prefetch_multiplier=1`` — a worker holds no build it is not running (one GPU,
  one build), so a queued build is never stuck behind a busy worker while another idles;
* ``visibility_timeout`` — Redis redelivers an unacknowledged message after it (a whole
  worker process killed by SIGKILL).

The job store stays the source of truth: a task only carries a job id, claiming is a
conditional ``UPDATE`` (a duplicate or late message is a no-op), and the API nodes'
watchdog requeues builds whose lease expired and re-sends builds whose message never
reached the broker, so nothing depends on a message being delivered exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

from trtquant.service.kinds import queue_name

__all__ = ["BUILD_TASK", "celery_app", "send_build"]

_LOG = logging.getLogger("trtquant.service")

BUILD_TASK = "trtquant.service.build"


def celery_app(broker_url: str, *, key_prefix: str | None = None, visibility_timeout_s: float = 3600.0,
               name: str = "trtquant") -> Any:
    """A Celery app for the build queues (API nodes only send; workers also register the task).

    Args:
        broker_url: ``redis://host:6379/0`` (RabbitMQ's ``amqp://`` works too).
        key_prefix: prefix of every Redis key of this deployment (several deployments, or
            tests, on one Redis).
        visibility_timeout_s: Redis redelivers a message not acknowledged within this time;
            longer than the longest build, or builds run twice (harmless, but wasted).
    """
    try:
        from celery import Celery  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - the service extra installs it
        raise ImportError(f"scale-out mode needs Celery: pip install 'trtquant[service]' ({exc})") from exc
    app = Celery(name, broker=broker_url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": float(visibility_timeout_s)}
    if key_prefix and broker_url.startswith(("redis://", "rediss://")):
        transport["global_keyprefix"] = key_prefix
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=f"{key_prefix or ''}trtquant.default",
        task_create_missing_queues=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted broker is waited for, not given up on
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the lease decides, not the broker link
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_heartbeat=0,
    )
    return app


def send_build(app: Any, job_id: str, kind: str) -> None:
    """Put one build on its kind's queue (retries a few times while the broker reconnects;
    raises when it stays unreachable: the job stays undispatched and the watchdog re-sends it)."""
    app.send_task(BUILD_TASK, args=[job_id], queue=queue_name(kind), retry=True,
                  retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.4, "interval_max": 1.0})


def broker_ping(app: Any, timeout_s: float = 2.0) -> None:
    """Raise when the broker does not answer within ``timeout_s``."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)
        client = getattr(conn.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):  # Redis: a real round trip
            client.ping()
