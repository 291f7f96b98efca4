"""Check that docs/settings.md lists every setting of ``celery_forkguard/settings.py``.

``python docs/check_settings.py`` (``nox -s docs`` runs it, with the package
installed): every ``Setting`` in ``celery_forkguard.settings.SETTINGS`` must
have a row in the first table of docs/settings.md that names, each in
backquotes, the setting, its Django name (``CELERY_`` + the name in capitals),
its default and every one of its environment variables; and every
``forkguard_*`` row of that table must be a real setting.  Exits 1 and says
what is missing otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parent / "settings.md"
ROW_NAME = re.compile(r"^\|\s*`(forkguard_[a-z0-9_]+)`\s*\|")


def table_rows(text: str) -> dict[str, str]:
    """The rows of the page's settings table, by setting name."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        match = ROW_NAME.match(line)
        if match:
            rows[match.group(1)] = line
    return rows


def default_spellings(default: Any) -> set[str]:
    """How the page may write a default: ``4.0``, ``False``, ``""``..."""
    spellings = {repr(default)}
    if isinstance(default, str):
        spellings.add(json.dumps(default))
    return spellings


def problems(settings: Any, text: str) -> list[str]:
    rows = table_rows(text)
    found = []
    known = set()
    for setting in settings:
        known.add(setting.name)
        row = rows.get(setting.name)
        if row is None:
            found.append(f"{setting.name}: no row in the settings table")
            continue
        cells = set(re.findall(r"`([^`]*)`", row))
        django = "CELERY_" + setting.name.upper()
        if django not in cells:
            found.append(f"{setting.name}: the Django name {django} is missing")
        if not cells & default_spellings(setting.default):
            found.append(f"{setting.name}: the default {setting.default!r} is missing")
        found += [f"{setting.name}: the environment variable {var} is missing"
                  for var in setting.env if var not in cells]
    found += [f"{name}: in the table, but not a setting in celery_forkguard/settings.py"
              for name in rows if name not in known]
    return found


def main() -> int:
    from celery_forkguard.settings import SETTINGS

    found = problems(SETTINGS, PAGE.read_text(encoding="utf-8"))
    for problem in found:
        print(f"docs/settings.md: {problem}", file=sys.stderr)
    if found:
        return 1
    print(f"docs/settings.md: all {len(SETTINGS)} settings listed, with their Django "
          "names, defaults and environment variables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
