"""Drift guard: `diff grpo.py X.py` shows X's algorithm and nothing else.

Rules, for every trainer X (the list, markers and budgets: tools/trainers.py):
1. Budget: the changed lines of `diff -u grpo.py X.py` (+ and - together, docstrings included) stay
   within X's budget, today's size: a change that is not X's algorithm cannot grow it.
2. Markers: in the code below the module docstring, every diff hunk that adds lines adds at least one
   line with a `# [X]` comment; a hunk that only deletes lines needs none (the reader sees the `-` lines).
   The marker is written one way, `# [X]` (its own hash), in comments only, never in a string or docstring.
3. Shape: every trainer's module docstring is at most 30 lines and ends with "Details: docs/<x>.md".
4. Skeleton: every trainer's loop carries grpo.py's numbered step comments, in the same order.
"""
import ast
import difflib
import io
import os
import shutil
import subprocess
import tokenize

import pytest

import re

from helpers import ROOT
from tools import trainers

TRAINERS = {f"{name}.py": (trainers.MARKERS[name], trainers.BUDGETS[name]) for name in trainers.MARKERS}
ALL = [f"{name}.py" for name in trainers.TRAINERS]


def changed_lines(a, b):
    """The + and - lines of `diff -u a b` (GNU diff where there is one, else difflib's unified diff)."""
    if shutil.which("diff"):
        out = subprocess.run(["diff", "-u", a, b], capture_output=True, text=True).stdout.splitlines()[2:]
    else:
        out = list(difflib.unified_diff(open(a).read().splitlines(), open(b).read().splitlines(), lineterm=""))[2:]
    return [l for l in out if l[:1] in "+-"]


def body(path):
    """The file's lines after its module docstring."""
    lines = open(path).read().splitlines()
    assert lines[0].startswith('"""'), f"{path} must start with a module docstring"
    end = next(i for i in range(1, len(lines)) if lines[i].rstrip().endswith('"""'))
    return lines[end + 1:]


def marked(line, marker):
    """True if the line carries the marker as `# [X]`, in a comment."""
    return "#" in line and f"# {marker}" in "#" + line.split("#", 1)[1]


def unmarked_hunks(base, other, marker):
    """Hunks of the diff base -> other that add lines but none with a `# [X]` comment."""
    bad = []
    for group in difflib.SequenceMatcher(None, base, other, autojunk=False).get_grouped_opcodes(0):
        added = [l for tag, i1, i2, j1, j2 in group if tag != "equal" for l in other[j1:j2]]
        removed = [l for tag, i1, i2, j1, j2 in group if tag != "equal" for l in base[i1:i2]]
        if added and not any(marked(l, marker) for l in added):
            bad.append("\n".join(["-" + l for l in removed] + ["+" + l for l in added]))
    return bad


def markers_in_strings(path, marker):
    """Line numbers where `marker` appears inside a string literal (docstrings included)."""
    toks = tokenize.generate_tokens(io.StringIO(open(path).read()).readline)
    return [t.start[0] for t in toks if t.type == tokenize.STRING and marker in t.string]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_diff_against_grpo_is_within_budget(name):
    marker, budget = TRAINERS[name]
    n = len(changed_lines(os.path.join(ROOT, "grpo.py"), os.path.join(ROOT, name)))
    assert n <= budget, f"diff -u grpo.py {name}: {n} changed lines, over the budget of {budget}"


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_added_hunk_is_marked(name):
    marker = TRAINERS[name][0]
    bad = unmarked_hunks(body(os.path.join(ROOT, "grpo.py")), body(os.path.join(ROOT, name)), marker)
    assert not bad, f"{name}: {len(bad)} diff hunk(s) vs grpo.py without a {marker} marker:\n\n" + "\n\n".join(bad[:5])


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_markers_only_in_comments_and_written_one_way(name):
    marker = TRAINERS[name][0]
    lines = markers_in_strings(os.path.join(ROOT, name), marker)
    assert not lines, f"{name}: {marker} inside a string or docstring on line(s) {lines}; markers go in comments"
    other_way = [i for i, l in enumerate(open(os.path.join(ROOT, name)).read().splitlines(), 1)
                 if marker in l and not marked(l, marker) and i not in lines]
    assert not other_way, f"{name}: {marker} not written as `# {marker}` on line(s) {other_way}"
    others = [m for other, (m, _) in TRAINERS.items() if other != name and m in open(os.path.join(ROOT, name)).read()]
    assert not others, f"{name} carries another trainer's marker: {others}"


@pytest.mark.parametrize("name", ALL)
def test_docstring_shape(name):
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, name)).read()))
    lines = doc.splitlines()
    assert len(lines) <= 30, f"{name}: module docstring of {len(lines)} lines; at most 30 (the rest goes to docs/)"
    for part in ("arXiv", "Launch:", "Departures from the paper, numbered:", "What changes versus"):
        assert part in doc, f"{name}: the docstring lacks {part!r}"
    assert lines[-1] == f"Details: docs/{name[:-3]}.md", f"{name}: the docstring must end with 'Details: docs/...'"
    assert os.path.isfile(os.path.join(ROOT, "docs", name[:-3] + ".md")), f"docs/{name[:-3]}.md is missing"


def step_comments(name):
    """The loop's numbered step comments, `# 4. old and ...` -> '4'."""
    return [m.group(1) for m in re.finditer(r"^ +# (\d)\. ", open(os.path.join(ROOT, name)).read(), re.M)]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_loop_carries_the_skeleton_s_numbered_steps_in_order(name):
    """grpo.py's steps 1 to 8 (prompts, rollout, rewards, log-probs, advantages, update, metrics, eval) appear in
    every trainer in that order; a trainer that merges two says so in one comment (dpo.py: `# 4. and 5.`)."""
    assert step_comments("grpo.py") == [str(i) for i in range(1, 9)]
    steps = step_comments(name)
    assert steps == sorted(steps) and set(steps) <= set("12345678"), (name, steps)
    merged = {"4", "5"} if re.search(r"# 4\. and 5\. ", open(os.path.join(ROOT, name)).read()) else set()
    assert set(steps) | merged == set("12345678"), (name, steps)


def test_checker_catches_unmarked_change_and_accepts_pure_deletion():
    base = ["a = 1", "b = 2", "c = 3"]
    assert unmarked_hunks(base, ["a = 1", "b = 5", "c = 3"], "[X]")
    assert not unmarked_hunks(base, ["a = 1", "b = 5  # [X] why", "c = 3"], "[X]")
    assert unmarked_hunks(base, ["a = 1", "b = '[X]'", "c = 3"], "[X]")  # in a string, not a comment
    assert not unmarked_hunks(base, ["a = 1", "c = 3"], "[X]")  # a pure deletion needs no marker


def test_budget_counter_counts_both_sides(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\ny = 2\nz = 3\n")
    b.write_text("x = 1\ny = 5\nz = 3\nw = 4\n")
    assert sorted(changed_lines(str(a), str(b))) == ["+w = 4", "+y = 5", "-y = 2"]
