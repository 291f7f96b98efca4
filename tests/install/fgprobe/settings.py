"""The example project's settings, with the probe app installed as well."""

from proj.settings import *  # noqa: F403  (the example's settings, unchanged)
from proj.settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "fgprobe"]
