"""What an installed package (no checkout) offers: the deployment files and the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from geventproxy.testing.launch import ROOT

DEPLOY = ROOT / "scripts" / "deploy"


def _python(*args: str, cwd: Path, lib: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(lib), "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _install(tmp: Path) -> Path:
    """The package as pip installs it: setuptools' build_py of a copy of the sources."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "geventproxy", src / "geventproxy")
    shutil.copytree(DEPLOY, src / "scripts" / "deploy")
    lib = tmp / "site-packages"
    build = _python(
        "-c",
        "from setuptools import setup; setup()",
        "-q",
        "build_py",
        f"--build-lib={lib}",
        cwd=src,
        lib=tmp / "nothing",
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    shutil.rmtree(src)  # nothing of the sources is left to fall back on
    return lib


def test_deploy_files_and_the_demo_after_install(tmp_path: Path) -> None:
    """1. Install the package into a directory of its own, away from any checkout.
    2. `python -m geventproxy deploy-files DIR` writes every file of scripts/deploy/,
       byte for byte; run again, it refuses to overwrite them (exit 2).
    3. `python -m geventproxy demo` runs the demo from the installed package: exit 0."""
    lib = _install(tmp_path)
    where = _python("-c", "import geventproxy; print(geventproxy.__file__)", cwd=tmp_path, lib=lib)
    assert where.stdout.startswith(str(lib)), where

    out = tmp_path / "etc"
    done = _python("-m", "geventproxy", "deploy-files", str(out), cwd=tmp_path, lib=lib)
    assert done.returncode == 0, done.stdout + done.stderr
    shipped = sorted(p.name for p in DEPLOY.iterdir() if p.is_file())
    assert {"prometheus.yml", "geventproxy.rules.yml", "haproxy.cfg"} <= set(shipped)
    assert sorted(p.name for p in out.iterdir()) == shipped
    assert done.stdout.splitlines() == [str(out / name) for name in shipped]
    for name in shipped:
        assert (out / name).read_bytes() == (DEPLOY / name).read_bytes(), name
    again = _python("-m", "geventproxy", "deploy-files", str(out), cwd=tmp_path, lib=lib)
    assert again.returncode == 2 and "not overwriting" in again.stderr, again

    demo = _python("-m", "geventproxy", "demo", cwd=tmp_path, lib=lib, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "OK!" in demo.stdout and '"msg_req":2600' in demo.stdout, demo.stdout
