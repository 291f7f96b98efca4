"""The project's Celery app, configured from Django's settings (``CELERY_*``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fgproject.settings")

app = Celery("fgproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
