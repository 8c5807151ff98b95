"""Build the optional compiled accelerator; everything else is in pyproject.toml.

``geventproxy._accel`` (C, CPython API) is built where a C compiler and the
Python headers are found. If the build fails for any reason the package is
installed without it and runs the pure-Python code (see geventproxy/accel.py).
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed build and carries on without the extension."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, a broken toolchain, ...
            self._skipped(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skipped(exc)

    @staticmethod
    def _skipped(exc: Exception) -> None:
        print(
            f"geventproxy: the compiled accelerator was not built ({exc}); "
            "the pure-Python implementation will be used",
            file=sys.stderr,
        )


setup(
    ext_modules=[Extension("geventproxy._accel", ["geventproxy/_accel.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
