"""Drift guard: each trainer differs from grpo.py only in places marked with its `[ALGO]` tag.

Rule: in `diff grpo.py X.py` (module docstrings excluded), every hunk must add at least one line
carrying the trainer's marker, e.g. `# [DAPO] clip-higher`. A hunk that only deletes lines must
still add a marker comment that says what was removed and why.
"""
import difflib
import os

import pytest

from conftest import ROOT

TRAINERS = {"dapo.py": "[DAPO]", "gspo.py": "[GSPO]", "sapo.py": "[SAPO]", "gfpo.py": "[GFPO]", "gtpo.py": "[GTPO]"}


def body(path):
    """The file's lines after its module docstring."""
    lines = open(path).read().splitlines()
    assert lines[0].startswith('"""'), f"{path} must start with a module docstring"
    end = next(i for i in range(1, len(lines)) if lines[i].rstrip().endswith('"""'))
    return lines[end + 1:]


def unmarked_hunks(base, other, marker):
    """Hunks of the diff base -> other with no added line containing `marker`."""
    bad = []
    for group in difflib.SequenceMatcher(None, base, other, autojunk=False).get_grouped_opcodes(0):
        added = [l for tag, i1, i2, j1, j2 in group if tag != "equal" for l in other[j1:j2]]
        removed = [l for tag, i1, i2, j1, j2 in group if tag != "equal" for l in base[i1:i2]]
        if not any(marker in l for l in added):
            bad.append("\n".join(["-" + l for l in removed] + ["+" + l for l in added]))
    return bad


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_diff_against_grpo_is_marked(name):
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not written yet")
    bad = unmarked_hunks(body(os.path.join(ROOT, "grpo.py")), body(path), TRAINERS[name])
    assert not bad, f"{name}: {len(bad)} diff hunk(s) vs grpo.py without a {TRAINERS[name]} marker:\n\n" + "\n\n".join(bad[:5])


def test_checker_catches_unmarked_change():
    base = ["a = 1", "b = 2", "c = 3"]
    assert unmarked_hunks(base, ["a = 1", "b = 5", "c = 3"], "[X]")
    assert not unmarked_hunks(base, ["a = 1", "b = 5  # [X] why", "c = 3"], "[X]")
    assert unmarked_hunks(base, ["a = 1", "c = 3"], "[X]")  # a silent deletion is caught
