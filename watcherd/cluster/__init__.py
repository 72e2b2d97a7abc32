"""Many hosts (design §10, docs/cluster.md): a dispatcher and GPU workers on Celery + RabbitMQ.

`app` builds the Celery app and the queues both sides declare; `dispatcher` gives the daemon's
main loop remote slots in place of OCR children; `worker` is the Celery worker whose task drives
the same supervised child as a single host. Celery is imported only when a role needs it.
"""
