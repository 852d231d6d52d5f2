"""tools/exercise.py: a student's copy of every trainer fails that trainer's spec tests, the original passes them, the
copy differs from the trainer only in the bodies of the algorithm's functions, and it runs from its own directory."""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from helpers import ROOT, cli_error
from tools import exercise, trainers

SPEC = [f"tests/test_{t}.py" for t in trainers.TRAINERS]


def spec_results(tmp_path, exercises):
    """Run every trainer's spec tests (GRPO_EXERCISES=exercises, or the originals); {file: [(test, failure text)]}."""
    xml = tmp_path / ("copies.xml" if exercises else "originals.xml")
    env = {k: v for k, v in os.environ.items() if k != "GRPO_EXERCISES"}
    if exercises:
        env["GRPO_EXERCISES"] = str(exercises)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *SPEC],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert xml.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    out = {}
    for case in ET.parse(xml).iter("testcase"):
        bad = [e for e in case if e.tag in ("failure", "error")]
        text = (bad[0].get("message", "") + "\n" + (bad[0].text or "")) if bad else None
        out.setdefault(case.get("classname").rsplit(".", 1)[-1], []).append((case.get("name"), text))
    return out


def test_every_trainer_s_copy_fails_its_spec_tests_and_the_original_passes(tmp_path):
    copies = tmp_path / "exercises"
    copies.mkdir()
    for t in trainers.TRAINERS:
        (copies / f"{t}.py").write_text(exercise.student_copy(t))
    originals = spec_results(tmp_path, None)
    assert set(originals) == {f"test_{t}" for t in trainers.TRAINERS}
    for name, cases in originals.items():
        assert cases and all(text is None for _, text in cases), (name, [c for c in cases if c[1]][:1])
    graded = spec_results(tmp_path, copies)
    for t in trainers.TRAINERS:
        failed = [text for _, text in graded[f"test_{t}"] if text]
        # every trainer's tests catch its own blanks: a NotImplementedError raised in that trainer's copy
        own = [f for f in failed if "NotImplementedError" in f and f"{copies / t}.py" in f]
        assert own, (t, failed[:1])
        assert all("NotImplementedError" in f for f in failed), (t, [f for f in failed if "NotImpl" not in f][:1])


def _strip_bodies(text, functions):
    """The text with the named top-level functions' lines below their docstrings removed."""
    lines = text.splitlines(keepends=True)
    nodes = {n.name: n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    for fn in sorted(functions, key=lambda f: -nodes[f].lineno):
        del lines[nodes[fn].body[0].end_lineno:nodes[fn].end_lineno]
    return "".join(lines)


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_a_copy_is_the_trainer_with_only_its_algorithm_s_bodies_replaced(name):
    original = open(trainers.path(name)).read()
    copy = exercise.student_copy(name)
    blanked = exercise.algorithm_functions(name)
    assert blanked
    assert _strip_bodies(copy, blanked) == _strip_bodies(original, blanked)  # the rest is the trainer, byte for byte
    nodes = {n.name: n for n in ast.parse(copy).body if isinstance(n, ast.FunctionDef)}
    for fn in blanked:
        node = nodes[fn]
        assert len(node.body) == 2 and isinstance(node.body[1], ast.Raise), fn  # docstring, raise
        assert node.body[1].exc.func.id == "NotImplementedError"
        hint = copy.splitlines()[node.body[0].end_lineno]
        assert hint.strip() == f"# Hint: {exercise.HINTS[f'{name}.{fn}']}"
    # every function the trainer marks as its own change is one the student writes
    marker = trainers.MARKERS.get(name)
    if marker:
        lines = original.splitlines()
        marked = [n.name for n in ast.parse(original).body if isinstance(n, ast.FunctionDef)
                  and marker in lines[n.lineno - 1] and n.name != "main"]
        assert set(marked) <= set(blanked), (marked, blanked)


def test_every_hint_belongs_to_a_blanked_function():
    blanked = {f"{t}.{f}" for t in trainers.TRAINERS for f in exercise.algorithm_functions(t)}
    assert set(exercise.HINTS) == blanked


def test_a_copy_runs_from_its_directory_and_stops_at_the_first_blank(tmp_path, tiny_dir):
    for t in ("grpo", "gspo"):
        (tmp_path / f"{t}.py").write_text(exercise.student_copy(t))
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = [sys.executable, str(tmp_path / "gspo.py"), "--tiny", "--num_steps=1", "--eval_problems=4",
           f"--run_dir={tmp_path / 'run'}"]
    p = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "NotImplementedError: policy_loss is the exercise" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([sys.executable, str(tmp_path / "grpo.py"), "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "--clip_eps" in p.stdout, p.stderr[-2000:]


def test_user_errors(tmp_path, capsys, monkeypatch):
    assert "unknown trainer(s) ['grp']" in cli_error(exercise, ["--trainers=grp"], capsys, monkeypatch)
    out = tmp_path / "hw"
    monkeypatch.setattr(sys, "argv", ["exercise.py", "--trainers=grpo,gspo", f"--out_dir={out}"])
    exercise.main()
    assert sorted(os.listdir(out)) == ["grpo.py", "gspo.py"]
    (out / "grpo.py").write_text("# a student's work\n")
    line = cli_error(exercise, ["--trainers=grpo", f"--out_dir={out}"], capsys, monkeypatch)
    assert "already holds grpo.py" in line and "--overwrite" in line
    assert (out / "grpo.py").read_text() == "# a student's work\n"
    assert "is a file" in cli_error(exercise, [f"--out_dir={out / 'gspo.py'}"], capsys, monkeypatch)
    # found by tests/test_fuzz.py: an empty --out_dir was a FileNotFoundError traceback from os.makedirs('')
    assert cli_error(exercise, ["--out_dir="], capsys, monkeypatch) == \
        "exercise.py: error: --out_dir= names no folder: give one (it is made if missing)"
