"""Shared fixtures: the tiny IF cascade (real checkpoints, random weights) and reference vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Nothing may come from the Hub in tests: the tiny checkpoints load through from_pretrained.
os.environ["HF_HUB_OFFLINE"] = "1"

DATA = Path(__file__).parent / "data"
STAGE1_DIR = DATA / "tiny-if" / "IF-I-tiny"
STAGE2_DIR = DATA / "tiny-if" / "IF-II-tiny"
REFERENCE = DATA / "reference" / "visible.safetensors"
CASES = json.loads((DATA / "reference" / "visible-cases.json").read_text())
TOLERANCE = 1e-3  # max |delta| agreed with the reference (fidelity contract)


@pytest.fixture(scope="session")
def reference():
    from safetensors.torch import load_file

    return load_file(str(REFERENCE))


@pytest.fixture(scope="session")
def text_encoder():
    from illusions.text import TextEncoder

    return TextEncoder.from_pretrained(str(STAGE1_DIR))


@pytest.fixture(scope="session")
def stage1():
    from illusions.models import load_unet_stage

    return load_unet_stage(str(STAGE1_DIR), 1)


@pytest.fixture(scope="session")
def stage2():
    from illusions.models import load_unet_stage

    return load_unet_stage(str(STAGE2_DIR), 2)
