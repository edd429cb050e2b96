"""Generates the gRPC modules from protos/ before every build (wheel, sdist and editable installs).

The generation runs when setuptools loads this file, so that package discovery (``anagram*`` in
pyproject.toml) already sees the generated package.
"""

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from gen_protos import generate  # noqa: E402

generate(ROOT)
setup()
