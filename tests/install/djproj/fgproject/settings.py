"""Settings of the test project; the only forkguard-specific line is the pool."""

import os

SECRET_KEY = "forkguard-install-test-only"  # a throwaway test project
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["fgtasks"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ["FG_BROKER_URL"]
CELERY_RESULT_BACKEND = os.environ["FG_RESULT_URL"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = False
# No -P on the command line: the worker must take the pool from here.
CELERY_WORKER_POOL = "forkguard"
