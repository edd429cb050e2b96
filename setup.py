"""Runs the proto code generation as part of every build (wheel, sdist and editable installs)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        sys.path.insert(0, str(ROOT / "tools"))
        from gen_protos import generate

        generate(ROOT)
        # Pick up the freshly generated package as well.
        self.packages = sorted(set(self.packages or []) | {"anagram", "anagram.v1"})
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
