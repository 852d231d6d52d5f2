"""The lock (requirements.lock, tools/lock.py): it agrees with requirements.txt, holds every package the code
imports, and the check finds each kind of disagreement; the refresh's writers produce files that agree."""
import ast
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions

import pytest

from helpers import ROOT
from tools import lock

OPTIONAL = {"matplotlib", "wandb"}  # imported inside a function, with an error that names the install command


def test_requirements_and_lock_agree():
    reqs, locked = lock.read_requirements(), lock.read_lock()
    assert lock.disagreements(reqs, locked) == []
    assert {"torch", "transformers", "datasets", "numpy", "tqdm", "peft", "pytest"} <= set(reqs)


def third_party_imports():
    """{top-level module: [files]} that the repository's code and tests import, the standard library and our own
    modules left out; whether the import sits inside a function."""
    dirs = ("", "grpo_family", "tools", "tests")
    ours = {"grpo_family", "tools"} | {f[:-3] for d in dirs for f in os.listdir(os.path.join(ROOT, d))
                                       if f.endswith(".py")}
    found = {}
    for d in dirs:
        for f in sorted(os.listdir(os.path.join(ROOT, d))):
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(ROOT, d, f)).read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        found.setdefault(top, []).append(os.path.join(d, f))
    return found


def test_every_package_the_code_imports_is_required_and_locked():
    reqs, locked, dists = lock.read_requirements(), lock.read_lock(), packages_distributions()
    imports = third_party_imports()
    assert {"torch", "transformers", "safetensors", "peft", "pytest"} <= set(imports)  # the scan sees imports
    for module, files in imports.items():
        if module in OPTIONAL:
            continue
        assert module in dists, f"{module} (imported by {files[0]}) is not installed"
        names = {lock.canonical(n) for n in dists[module]}
        assert names & set(reqs), f"{module} (imported by {files[0]}) is not in requirements.txt"
        assert names & set(locked), f"{module} (imported by {files[0]}) is not in requirements.lock"
    for module in OPTIONAL:
        assert not {lock.canonical(n) for n in dists.get(module, [module])} & set(reqs), f"{module} is optional"


def test_the_check_finds_each_kind_of_disagreement():
    reqs = {"torch": ">=2.4,<=2.13.0", "transformers": ">=4.46,<=5.25.0", "numpy": ">=1.24"}
    locked = {"torch": ("2.13.0", ["-r requirements.txt"]), "transformers": ("5.26.0", ["-r requirements.txt"]),
              "jinja2": ("3.1.6", ["torch"]), "markupsafe": ("3.0.4", ["jinja2"]), "pandas": ("3.1.1", ["datasets"])}
    bad = lock.disagreements(reqs, locked)
    assert bad == ["transformers==5.26.0 in requirements.lock is outside requirements.txt's range '>=4.46,<=5.25.0'",
                   "numpy is in requirements.txt but not in requirements.lock",
                   "numpy in requirements.txt has no cap: add <= the locked version",
                   "pandas==3.1.1 is in requirements.lock but neither requirements.txt nor a locked package needs it "
                   "(via datasets)"]
    locked["numpy"] = ("2.4.6", ["torch"])  # locked, but not marked as asked for by requirements.txt
    assert "numpy is in requirements.txt but requirements.lock does not mark it '# via -r requirements.txt'" in \
        lock.disagreements(reqs, locked)


def test_versions_compare_as_releases():
    assert lock.in_range("2.13.0+cpu", ">=2.4,<=2.13.0") and lock.in_range("2.13", "==2.13.0")
    assert not lock.in_range("2.13.1", ">=2.4,<=2.13.0") and not lock.in_range("2.3.9", ">=2.4")
    assert lock.in_range("2026.9.0", ">=2023.1") and lock.in_range("0.0.7", "<0.1")
    assert lock.version_key("5.0rc1") < lock.version_key("5.0") < lock.version_key("5.0.1")
    assert lock.version_key("4.10") > lock.version_key("4.9")


def test_the_installed_check_compares_exact_versions(monkeypatch):
    import importlib.metadata as md
    have = {"torch": "2.13.0+cpu", "numpy": "2.4.5"}

    def version(name):
        if name not in have:
            raise md.PackageNotFoundError(name)
        return have[name]
    monkeypatch.setattr(md, "version", version)
    locked = {"torch": ("2.13.0", []), "numpy": ("2.4.6", []), "tqdm": ("4.70.1", [])}
    assert lock.installed_disagreements(locked) == ["numpy 2.4.5 is installed but 2.4.6 is locked",
                                                    "tqdm==4.70.1 is locked but not installed"]


def test_refresh_writes_a_lock_and_caps_that_agree(tmp_path):
    """The refresh's last steps on a made-up environment: the lock holds what requirements.txt pulls in (not the
    rest), torch without its build label, and the caps move to the new versions."""
    env = {"torch": {"version": "2.14.1+cpu", "requires": ["jinja2"]},
           "jinja2": {"version": "3.1.6", "requires": ["markupsafe"]}, "markupsafe": {"version": "3.0.4", "requires": []},
           "tqdm": {"version": "4.71.0", "requires": []}, "pip": {"version": "26.1", "requires": []},
           "black": {"version": "25.1.0", "requires": []}}  # installed by hand: no requirement pulls it in
    reqs_path, lock_path = tmp_path / "requirements.txt", tmp_path / "requirements.lock"
    reqs_path.write_text("# a comment line stays\ntorch>=2.4,<=2.13.0\ntqdm<=4.70.1  # a trailing comment stays\n")
    lock.recap(str(reqs_path), env)
    assert reqs_path.read_text() == "# a comment line stays\ntorch>=2.4,<=2.14.1\ntqdm<=4.71.0  # a trailing comment stays\n"
    reqs = lock.read_requirements(str(reqs_path))
    lock.write_lock(env, reqs, "test", path=str(lock_path))
    locked = lock.read_lock(str(lock_path))
    assert locked == {"jinja2": ("3.1.6", ["torch"]), "markupsafe": ("3.0.4", ["jinja2"]),
                      "torch": ("2.14.1", ["-r requirements.txt"]), "tqdm": ("4.71.0", ["-r requirements.txt"])}
    assert lock.disagreements(reqs, locked) == []


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "tools.lock", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, **kw)


def test_check_command_and_its_errors(tmp_path, monkeypatch, capsys):
    p = cli(["check"])
    assert p.returncode == 0 and p.stdout.startswith("lock: ") and "agree" in p.stdout, p.stderr
    p = cli(["check", "--bogus"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unrecognized arguments: --bogus" in p.stderr
    bad = tmp_path / "requirements.lock"
    bad.write_text("torch>=2.4\n")
    monkeypatch.setattr(lock, "LOCK", str(bad))
    with pytest.raises(SystemExit) as e:
        lock.main(["check"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"lock.py: error: {bad}:1: cannot read 'torch>=2.4': every entry is 'name==version  # via")
    monkeypatch.setattr(lock, "LOCK", str(tmp_path / "none.lock"))
    with pytest.raises(SystemExit) as e:
        lock.main(["refresh"])
    assert e.value.code == 2 and "no requirements.lock yet" in capsys.readouterr().err


def test_the_lock_header_says_what_passed():
    head = [l for l in open(lock.LOCK) if l.startswith("#")]
    assert any(l.startswith("# Passed on ") and "Python " in l and "torch " in l and "suite: " in l for l in head), head
    assert json.dumps(lock.read_lock()["torch"][0]).strip('"').count("+") == 0  # any build of that torch


def test_the_lock_header_and_readme_give_the_same_suite_run():
    """The lock's header and README quote one fresh-clone .ci/run: the same counts and pytest's seconds."""
    head = next(l for l in open(lock.LOCK) if l.startswith("# Passed on "))
    in_lock = re.search(r"suite: (\d+) passed, (\d+) skipped in (\d+)(?:\.\d+)?s", head)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    in_readme = re.search(r"`\.ci/run` \([^)]*\) (\d+) passed\s+and (\d+) skipped in (\d+) s of pytest", readme)
    assert in_lock and in_readme, (head, "README names no `.ci/run` (...) N passed and M skipped in S s of pytest")
    assert in_lock.groups() == in_readme.groups(), (in_lock.groups(), in_readme.groups())


@pytest.mark.parametrize("which", ["REQUIREMENTS", "LOCK"])
def test_a_file_that_is_not_utf8_is_one_line(which, tmp_path, monkeypatch, capsys):
    """A latin-1 byte (an editor's save) in requirements.txt or requirements.lock: one line naming the file, exit 2."""
    good = open(getattr(lock, which), encoding="utf-8").read()
    bad = tmp_path / os.path.basename(getattr(lock, which))
    bad.write_bytes(good.encode() + "# caf\xe9\n".encode("latin-1"))
    monkeypatch.setattr(lock, which, str(bad))
    with pytest.raises(SystemExit) as e:
        lock.main(["check"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lock.py: error: {bad}: not UTF-8 text (byte 0xe9 at offset {len(good.encode()) + 5})"), err
