"""Check the sdist and wheel that ``nox -s build`` made: ``python .ci/check_dist.py DIST_DIR``.

The sdist must carry the license, the changelog, the tests and the docs, and
no caches; the wheel's METADATA must state the SPDX license and the version
in ``celery_forkguard/__init__.py`` (read without importing the package, so
this runs without Celery installed).
"""

from __future__ import annotations

import ast
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSE = "BSD-3-Clause"
SDIST_FILES = ("LICENSE", "CHANGELOG.md", "README.md", "noxfile.py", ".ci/run", "PKG-INFO")
SDIST_DIRS = ("tests/", "docs/", "examples/", "benchmarks/")
SDIST_BANNED = ("__pycache__", ".pyc", ".nox/", ".venv")


def source_version() -> str:
    tree = ast.parse((ROOT / "celery_forkguard" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise SystemExit("celery_forkguard/__init__.py sets no __version__")


def only(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {dist.name}/, found {[p.name for p in found]}")
    return found[0]


def check_sdist(path: Path, version: str) -> list[str]:
    errors = []
    with tarfile.open(path) as tar:
        names = tar.getnames()
        top = f"celery_forkguard-{version}/"
        members = {n[len(top):] for n in names if n.startswith(top)}
        errors += [f"sdist: {n} is outside {top}" for n in names
                   if not n.startswith(top) and n != top.rstrip("/")]
        pkg_info = tar.extractfile(top + "PKG-INFO") if top + "PKG-INFO" in names else None
        meta = HeaderParser().parsestr(pkg_info.read().decode()) if pkg_info else None
    errors += [f"sdist: no {f}" for f in SDIST_FILES if f not in members]
    errors += [f"sdist: nothing under {d}" for d in SDIST_DIRS
               if not any(m.startswith(d) and len(m) > len(d) for m in members)]
    errors += [f"sdist: holds {m}" for m in sorted(members)
               if any(b in m for b in SDIST_BANNED)]
    if meta is not None:
        errors += check_metadata("sdist PKG-INFO", meta, version)
    return errors


def check_wheel(path: Path, version: str) -> list[str]:
    dist_info = f"celery_forkguard-{version}.dist-info/"
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        if dist_info + "METADATA" not in names:
            return [f"wheel: no {dist_info}METADATA"]
        meta = HeaderParser().parsestr(whl.read(dist_info + "METADATA").decode())
    errors = check_metadata("wheel METADATA", meta, version)
    if dist_info + "licenses/LICENSE" not in names:
        errors.append(f"wheel: no {dist_info}licenses/LICENSE")
    if "celery_forkguard/py.typed" not in names:
        errors.append("wheel: no celery_forkguard/py.typed")
    return errors


def check_metadata(where: str, meta: Message, version: str) -> list[str]:
    errors = []
    if meta["Version"] != version:
        errors.append(f"{where}: Version {meta['Version']!r}, __version__ is {version!r}")
    if meta["License-Expression"] != LICENSE:
        errors.append(f"{where}: License-Expression {meta['License-Expression']!r}, not {LICENSE}")
    if "LICENSE" not in (meta.get_all("License-File") or []):
        errors.append(f"{where}: no License-File: LICENSE")
    if any(c.startswith("License ::") for c in meta.get_all("Classifier") or []):
        errors.append(f"{where}: a License classifier next to License-Expression")
    return errors


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    dist = Path(argv[1])
    version = source_version()
    sdist = only(dist, "celery_forkguard-*.tar.gz")
    wheel = only(dist, "celery_forkguard-*.whl")
    errors = check_sdist(sdist, version) + check_wheel(wheel, version)
    for error in errors:
        print("FAIL", error)
    if errors:
        return 1
    print(f"ok: {sdist.name} and {wheel.name}: version {version}, License-Expression {LICENSE}, "
          f"sdist has {', '.join(SDIST_FILES[:2] + SDIST_DIRS[:2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
