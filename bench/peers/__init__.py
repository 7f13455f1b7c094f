"""The peer job queues (Celery, RQ, arq, Dramatiq, taskiq, Procrastinate), side by side."""
