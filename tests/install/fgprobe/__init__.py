"""A probe app the install tests add to a copy of ``examples/django_project``.

The tests copy the example project out of the repository, put this package
beside its ``manage.py`` and start ``celery -A proj worker`` there with
``DJANGO_SETTINGS_MODULE=fgprobe.settings``: the example's own settings (the
pool from ``CELERY_WORKER_POOL`` alone) plus this app, whose tasks report
what only a test wants to know (where the package was imported from, what
Celery's Django fixup decided), so none of that lives in the example.
"""
