"""WSGI entry point (``gunicorn proj.wsgi``); the worker does not use it."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

application = get_wsgi_application()
