"""The Celery app both roles build from `cluster.*`, and the queues they declare.

Choices, each for a failure it prevents:
- JSON only, never pickle: the broker is on the network, and unpickling a message is running it.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only after its file's
  outcome is on its way to the dispatcher; a worker (or just its pool process) that dies puts it
  back in the queue, for another worker.
- prefetch 1, concurrency 1: a GPU worker holds one file, never a queue of them that its death
  would delay.
- A durable quorum queue with `x-delivery-limit`: RabbitMQ counts returned deliveries itself; a
  file that kills every worker that takes it is dead-lettered to `<queue>.dead` after
  `cluster.max_deliveries` deliveries, where the dispatcher reads it and fails the file as
  `child_crashed`. Dispatcher and workers must agree on `max_deliveries` (the queue's arguments
  are fixed when it is first declared; RabbitMQ refuses a different declaration).
- Replies (started, progress, outcome) go to a durable queue per dispatcher and inbox,
  `<queue>.reply.<inbox id>`: they outlive a dispatcher restart (and are then dropped as stale,
  loudly) and a broker restart. Celery's result backends are not used: `rpc://` replies die with
  the dispatcher's connection, and polling a backend per task is what the reply queue avoids.
- No ETA/countdown anywhere: deferrals are the dispatcher's (its backlog), and RabbitMQ holds
  ETA messages unacknowledged in the worker, which defeats `consumer_timeout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu import Exchange, Queue

from watcherd.core.settings import ClusterSettings

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "watcherd.ocr"
BROKER_HEARTBEAT_S = 10


def task_queue(cluster: ClusterSettings) -> Queue:
    return Queue(
        cluster.queue,
        # topic, not direct: Celery's quorum-queue support warns that ETA tasks would block on a
        # direct exchange. watcherd sends none (deferrals are the dispatcher's); this keeps it quiet.
        Exchange(cluster.queue, type="topic", durable=True),
        routing_key=cluster.queue,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            # deliveries = returns + 1: a message returned `limit` times is dead-lettered on the next return
            "x-delivery-limit": cluster.max_deliveries - 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_queue_name(cluster),
        },
    )


def dead_queue_name(cluster: ClusterSettings) -> str:
    return f"{cluster.queue}.dead"


def dead_queue(cluster: ClusterSettings) -> Queue:
    name = dead_queue_name(cluster)
    return Queue(name, Exchange(""), routing_key=name, durable=True)


def reply_queue(cluster: ClusterSettings, inbox_id: str) -> Queue:
    name = f"{cluster.queue}.reply.{inbox_id}"
    return Queue(name, Exchange(""), routing_key=name, durable=True)


def make_app(cluster: ClusterSettings) -> Celery:
    from celery import Celery

    assert cluster.broker_url is not None  # settings require it for both roles
    app = Celery("watcherd", broker=cluster.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        task_queues=[task_queue(cluster)],
        task_default_queue=cluster.queue,
        task_create_missing_queues=False,
        broker_heartbeat=BROKER_HEARTBEAT_S,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={"confirm_publish": True},
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_detect_quorum_queues=True,
    )
    return app


def map_path(path: str, path_map: dict[str, Any]) -> str:
    """Where a worker finds `path`: the longest `cluster.path_map` prefix (whole folder names
    only) replaced; a path no prefix covers is sent as it is (shared storage mounted alike)."""
    best = ""
    for prefix in path_map:
        stripped = prefix.rstrip("/") or "/"
        if (path == stripped or path.startswith(stripped.rstrip("/") + "/")) and len(stripped) > len(best):
            best = stripped
    if not best:
        return path
    rest = path[len(best) :].lstrip("/")
    target = str(path_map[best if best in path_map else best + "/"]).rstrip("/") or "/"
    return f"{target}/{rest}" if rest else target
