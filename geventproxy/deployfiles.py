"""``geventproxy deploy-files DIR``: copy the deployment files out of the package.

The files live in the repository's ``scripts/deploy/``; a build ships that
directory inside the package as ``geventproxy/deploy/`` (see
``pyproject.toml``), so an installed proxy can hand them out without the
repository. From a checkout, ``scripts/deploy/`` itself is used.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["deploy_dir", "main"]

_PACKAGE = Path(__file__).resolve().parent
USAGE = (
    "usage: geventproxy deploy-files DIR\n"
    "copy the supervisord, systemd, Prometheus and HAProxy files into DIR (made if missing)"
)


def deploy_dir() -> Path | None:
    """Where the deployment files are: in the package once built, else in the checkout."""
    for candidate in (_PACKAGE / "deploy", _PACKAGE.parent / "scripts" / "deploy"):
        if candidate.is_dir():
            return candidate
    return None


def main(argv: Sequence[str]) -> int:
    """Copy every deployment file into the directory ``argv[0]``; never overwrite one."""
    if list(argv) in (["-h"], ["-help"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    source = deploy_dir()
    if source is None:
        print("geventproxy: error: the deployment files are not installed", file=sys.stderr)
        return 1
    target = Path(argv[0])
    files = sorted(p for p in source.iterdir() if p.is_file())
    clashes = [target / p.name for p in files if (target / p.name).exists()]
    if clashes:
        print(f"geventproxy: error: {clashes[0]} exists; not overwriting", file=sys.stderr)
        return 2
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, target / path.name)
        print(target / path.name)
    return 0
