"""Fixtures, and the `slow` marker. The helpers the tests share are in helpers.py (imported, not a fixture).

    tiny_dir    the warm-started tiny model, built once per cache (and per $GRPO_TINY_SEED), then loaded from disk
    slow        learning runs, real-width and 1.5B-shape runs, the browser test, timing-under-load tests: the whole
                suite runs them (CI does); `python -m pytest -q tests -m "not slow"` is the loop to run while working
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers.py, for the tests and tests/launch/
from helpers import single_process  # noqa: E402
from grpo_family import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning run, a real-width or 1.5B-shape run, the browser test, or "
                                       "a timing-under-load test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_dir():
    """The warm-started tiny model (built once per cache, then loaded from disk)."""
    return tiny.ensure_model(single_process(), log=lambda *a: None)
