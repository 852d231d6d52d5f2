"""
lock.py: the versions this repository is tested with, kept in requirements.lock.

    python -m tools.lock check               requirements.txt and requirements.lock agree (the test suite runs this)
    python -m tools.lock check --installed   ... and this environment holds exactly the locked versions (CI)
    python -m tools.lock refresh             move the lock forward: newest versions in a fresh venv, the suite,
                                               and only if it passes, a new requirements.lock and new caps

requirements.txt holds ranges (for people who add this repo to an environment of their own), each capped at
the newest version the suite passed with. requirements.lock holds every package the suite ran with, exact,
each with the package that pulled it in (`# via`), so a package nobody needs any more is caught.

refresh: a venv in a temporary dir; `pip install torch==<--torch>` (default: the locked torch; on a machine whose
pip has a CPU wheel of it, that one); `pip install --upgrade` of requirements.txt's names with their lower
bounds only (the caps lifted); then README's test command in that venv. A failing suite writes nothing and
exits 1, naming the log. Needs the package registry and about 20 minutes on 2 cores.

What it holds: read_text, read_requirements, read_lock (the two files, as UTF-8), canonical, version_key, in_range
(names and versions compared as pip does), disagreements, installed_disagreements (the check), write_lock, recap,
refresh (the refresh), LockError and Parser (one-line errors, exit 2), main.
"""
import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
LOCK = os.path.join(ROOT, "requirements.lock")
TEST_COMMAND = ["-m", "pytest", "-q", "tests"]  # README's test command, run by the venv's python
NOT_LOCKED = {"pip", "setuptools", "wheel"}  # the venv's own tools


class LockError(ValueError):
    """A disagreement or a mistake, reported in one line (exit 2)."""


def canonical(name):
    """PEP 503 name: 'Jinja2' and 'jinja2', 'typing_extensions' and 'typing-extensions' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_text(path):
    """A file of this repository's own as UTF-8 text; one that is not is a LockError naming the file and the byte."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise LockError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): write it as "
                        "UTF-8 (git checkout restores the committed file)") from None


def read_requirements(path=None):
    """{name: specifier text} of requirements.txt (comments and blank lines skipped)."""
    path, out = path or REQUIREMENTS, {}
    for n, line in enumerate(read_text(path).split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:(?:>=|<=|==|<|>)\s*[0-9][0-9a-z.]*\s*,?\s*)*)", line)
        if not m:
            raise LockError(f"{path}:{n}: cannot read {line!r}: write a name and ranges such as 'torch>=2.4,<=2.13.0'")
        if canonical(m.group(1)) in out:
            raise LockError(f"{path}:{n}: {m.group(1)} is listed twice")
        out[canonical(m.group(1))] = m.group(2).replace(" ", "")
    return out


def read_lock(path=None):
    """{name: (version, [packages that pulled it in; '-r requirements.txt' for a direct one])} of the lock."""
    path, out = path or LOCK, {}
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)\s*#\s*via\s+(.+)", line.strip())
        if not m:
            raise LockError(f"{path}:{n}: cannot read {line.strip()!r}: every entry is 'name==version  # via ...'")
        out[canonical(m.group(1))] = (m.group(2), [canonical(v.strip()) if not v.strip().startswith("-r")
                                                   else v.strip() for v in m.group(3).split(",")])
    return out


def version_key(v):
    """A release version as a comparable tuple: '2.13.0+cpu' -> (2, 13, 0); pre-releases sort before the release
    ('2.0rc1' -> (2, 0, -1, 1)). Enough for this repository's own files, and no dependency to read them."""
    m = re.match(r"(\d+(?:\.\d+)*)(?:\.?(a|b|rc)(\d+))?", v.split("+")[0].lower())
    if not m:
        raise LockError(f"cannot read the version {v!r}")
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()  # 2.13 == 2.13.0
    return tuple(release) + ((-3 + ["a", "b", "rc"].index(m.group(2)), int(m.group(3))) if m.group(2) else (0,))


def in_range(version, spec):
    """True if `version` satisfies every clause of `spec` ('>=2.4,<=2.13.0')."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
           "<": lambda a, b: a < b, ">": lambda a, b: a > b}
    clauses = [re.fullmatch(r"(>=|<=|==|<|>)(.+)", c) for c in spec.split(",") if c]
    return all(ops[c.group(1)](version_key(version), version_key(c.group(2))) for c in clauses)


def disagreements(reqs, lock):
    """What is wrong between requirements.txt and the lock, one line each (empty when they agree)."""
    bad = []
    for name, spec in reqs.items():
        if name not in lock:
            bad.append(f"{name} is in requirements.txt but not in requirements.lock")
        elif not in_range(lock[name][0], spec):
            bad.append(f"{name}=={lock[name][0]} in requirements.lock is outside requirements.txt's range {spec!r}")
        elif "-r requirements.txt" not in lock[name][1]:
            bad.append(f"{name} is in requirements.txt but requirements.lock does not mark it "
                       "'# via -r requirements.txt'")
        if not re.search(r"(<=|<|==)", spec):
            bad.append(f"{name} in requirements.txt has no cap: add <= the locked version")
    reached, todo = set(), [n for n in lock if n in reqs]
    while todo:  # every locked package must be needed: required, or pulled in by a needed one
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo += [m for m, (_, via) in lock.items() if n in via]
    for name, (version, via) in lock.items():
        if name not in reached:
            bad.append(f"{name}=={version} is in requirements.lock but neither requirements.txt nor a locked package "
                       f"needs it (via {', '.join(via)})")
    return bad


def installed_disagreements(lock):
    """Locked packages this environment lacks or holds at another version (a local label such as +cpu ignored)."""
    from importlib.metadata import PackageNotFoundError, version
    bad = []
    for name, (want, _) in lock.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            bad.append(f"{name}=={want} is locked but not installed")
            continue
        if have.split("+")[0] != want.split("+")[0]:
            bad.append(f"{name} {have} is installed but {want} is locked")
    return bad


# Run by the fresh venv's python: each installed package's version and the installed packages it requires.
_DUMP = r"""
import json, re
from importlib.metadata import distributions
from packaging.requirements import Requirement
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
dists = {canon(d.metadata["Name"]): d for d in distributions()}
out = {}
for name, d in dists.items():
    needs = []
    for r in d.requires or []:
        r = Requirement(r)
        if (r.marker is None or r.marker.evaluate({"extra": ""})) and canon(r.name) in dists:
            needs.append(canon(r.name))
    out[name] = {"version": d.version, "requires": needs}
print(json.dumps(out))
"""


def write_lock(env, reqs, torch_note, path=None):
    """requirements.lock from an environment's {name: {version, requires}}: the packages reachable from reqs."""
    via = {n: [] for n in env}
    for n, info in env.items():
        for m in info["requires"]:
            via[m].append(n)
    keep, todo = set(), [n for n in reqs]
    while todo:
        n = todo.pop()
        if n not in keep and n in env:
            keep.add(n)
            todo += env[n]["requires"]
    lines = ["# requirements.lock: every package the whole test suite passed with, exact. Written by",
             "# `python -m tools.lock refresh` (it runs the suite first); do not edit by hand.",
             f"# Passed on {datetime.date.today()}: Python {platform.python_version()}, {platform.system()} "
             f"{platform.machine()}, {torch_note}.",
             "# Install: pip install -r requirements.lock (README says how to get the CUDA build of the same torch)."]
    for n in sorted(keep - NOT_LOCKED):
        version = env[n]["version"].split("+")[0]  # torch 2.13.0+cpu is locked as 2.13.0: any build of it
        reasons = (["-r requirements.txt"] if n in reqs else []) + sorted(v for v in via[n] if v in keep)
        lines.append(f"{n}=={version}  # via {', '.join(reasons)}")
    with open(path or LOCK, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def recap(reqs_path, env):
    """requirements.txt with each cap moved to the version the suite just passed with."""
    text = read_text(reqs_path)

    def cap(m):
        name = canonical(m.group(1))
        lower = m.group(2) + "," if m.group(2) else ""
        return m.group(0) if name not in env else f"{m.group(1)}{lower}<={env[name]['version'].split('+')[0]}"
    text = re.sub(r"(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)((?:>=[^,\s#]+)?),?<=[^\s#]+", cap, text)
    with open(reqs_path, "w", encoding="utf-8") as f:
        f.write(text)


def refresh(torch_version, keep_venv):
    reqs = read_requirements()
    lows = [name + ",".join(s for s in spec.split(",") if s.startswith(">=")) for name, spec in reqs.items()
            if name != "torch"]
    tmp = tempfile.mkdtemp(prefix="lock-refresh-")
    venv, log = os.path.join(tmp, "venv"), os.path.join(tmp, "suite.log")
    py = os.path.join(venv, "bin", "python")
    print(f"refresh: a fresh venv in {venv}; torch=={torch_version}, then the newest of: {' '.join(lows)}")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [py, "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [f"torch=={torch_version}"], check=True)
    subprocess.run(pip + ["--upgrade"] + lows, check=True)
    env_vars = {**os.environ, "GRPO_TINY_CACHE": os.path.join(tmp, "tiny-cache")}  # the tiny model built afresh
    print(f"refresh: running the suite ({' '.join(['python'] + TEST_COMMAND)}), log in {log}")
    with open(log, "w") as f:
        rc = subprocess.run([py] + TEST_COMMAND, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env_vars).returncode
    if rc != 0:
        print(f"refresh: the suite failed (exit {rc}) with the newest versions; nothing written. See {log}",
              file=sys.stderr)
        sys.exit(1)
    import json
    env = json.loads(subprocess.run([py, "-c", _DUMP], check=True, capture_output=True, text=True).stdout)
    tail = open(log).read().strip().splitlines()[-1]
    write_lock(env, reqs, f"torch {env['torch']['version']}; suite: {tail.strip('= ')}")
    recap(REQUIREMENTS, env)
    if subprocess.run([py, "-m", "tools.lock", "check"], cwd=ROOT).returncode:
        raise LockError("the new requirements.lock and requirements.txt disagree (above); fix tools/lock.py")
    print(f"refresh: wrote {LOCK} and moved requirements.txt's caps; review with git diff, then commit")
    if not keep_venv:
        import shutil
        shutil.rmtree(venv)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every entry point of this repository
        print(f"lock.py: error: {message} (see python -m tools.lock --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = Parser(prog="python -m tools.lock", description=__doc__.strip().splitlines()[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="requirements.txt and requirements.lock agree")
    c.add_argument("--installed", action="store_true", help="also: this environment holds exactly the lock")
    r = sub.add_parser("refresh", help="newest versions in a fresh venv; the lock only if the suite passes")
    r.add_argument("--torch", default="", help="the torch version to test (default: the locked one)")
    r.add_argument("--keep_venv", action="store_true", help="keep the fresh venv (its path is printed)")
    args = p.parse_args(argv)  # a bad flag: one line, exit 2
    try:
        if args.command == "check":
            lock = read_lock()
            bad = disagreements(read_requirements(), lock) + (installed_disagreements(lock) if args.installed else [])
            if bad:
                raise LockError(f"{len(bad)} problem(s): " + "; ".join(bad) +
                                " (fix: pip install -r requirements.lock, or python -m tools.lock refresh)")
            print(f"lock: {len(lock)} packages; requirements.txt and requirements.lock agree"
                  + ("; this environment holds exactly the lock" if args.installed else ""))
        elif not args.torch and not os.path.isfile(LOCK):
            raise LockError("there is no requirements.lock yet to take torch's version from: pass --torch=VERSION")
        else:
            refresh(args.torch or read_lock()["torch"][0], args.keep_venv)
    except (LockError, OSError) as e:
        print(f"lock.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
