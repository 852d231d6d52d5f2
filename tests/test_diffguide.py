"""The README's "how X differs from GRPO" diff blocks match the files (python diffguide.py fixes them)."""
import os

import pytest

import diffguide
from conftest import ROOT


def test_readme_diff_blocks_are_current():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert diffguide.render(readme) == readme, "README.md diff blocks are stale: run `python diffguide.py`"


@pytest.mark.parametrize("name", diffguide.TRAINERS)
def test_every_trainer_has_a_block(name):
    if not os.path.exists(os.path.join(ROOT, name)):
        pytest.skip(f"{name} not written yet")
    assert f"<!-- diff:{name} begin -->" in open(os.path.join(ROOT, "README.md")).read()


def test_stale_block_is_detected():
    readme = open(os.path.join(ROOT, "README.md")).read()
    name = next(n for n in diffguide.TRAINERS if os.path.exists(os.path.join(ROOT, n)))
    stale = readme.replace(f"<!-- diff:{name} begin -->\n", f"<!-- diff:{name} begin -->\nold text\n", 1)
    assert diffguide.render(stale) != stale
