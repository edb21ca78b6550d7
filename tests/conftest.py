import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def dist1():
    """A single-process gloo group with model-parallel size 1, for building models in-process."""
    from llama.dist import setup

    return setup(mp=1, device="cpu")
