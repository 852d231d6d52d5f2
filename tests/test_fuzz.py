"""The fuzzer: every entry point's flags, and the answer parser, driven with boundary and hostile values (hypothesis).

    test_flags_parse      1 to 3 hostile flags read by a script's Config, in process: a Config whose numbers the code
                          can carry (integers in int64, no nan), or a UserError of one line
    test_flags_run        one hostile flag on a small real run of an entry point, in process as its __main__ runs it:
                          exit 0, or exit 2 with one stderr line (progress bars aside), no traceback, in TIME_BOUND s
    test_flags_cli        the same through the real interpreter (argv's bytes, stdout's encoding, the import path)
    test_answer_is_...    a number written with hostile Unicode in or around it reads as the intended number or as
                          no number: never a cut number, never the wrong sign

Flags and their types come from each script's Config (dataclasses.fields), so a new flag is fuzzed as soon as it
exists. Cases are derandomized, with no example database: every run draws the same cases. The fast loop
(-m "not slow") runs FAST's counts, the full suite FULL's as well (slow-marked).
"""
import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import unicodedata
from fractions import Fraction

import datasets.config
import huggingface_hub.constants
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from grpo_family import config, gsm8k, tiny
from helpers import ROOT
from tools import trainers

FAST, FULL = dict(parse=300, run=40, cli=2, answer=400), dict(parse=600, run=120, cli=4, answer=3000)
PROFILES = [pytest.param(FAST, id="fast"), pytest.param(FULL, id="full", marks=pytest.mark.slow)]
TIME_BOUND = 30  # seconds a small run may take (about 1 s in process); a hostile value must not make one endless
INT64 = 2**63 - 1


def check(prop, strategy, n):
    """The property over n cases: derandomized (the same cases every run), no database, no per-case deadline
    (TIME_BOUND bounds a run instead)."""
    settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
             suppress_health_check=list(HealthCheck))(given(strategy)(prop))()


# -----------------------------------------------------------------------------
# the entry points, each with the argv of a small real run (paths relative: a run's cwd is its own temp dir)

TRAINER_BASE = ["--tiny", "--num_steps=1", "--batch_prompts=2", "--eval_problems=2", "--eval_every=0",
                "--save_every=1", "--run_dir=run"]
ENTRIES = {name: (name, TRAINER_BASE) for name in trainers.TRAINERS}
ENTRIES.update({
    "sample": ("sample", ["--tiny", "--num_questions=1", "--max_new_tokens=4"]),
    "eval_gsm8k": ("eval_gsm8k", ["--tiny", "--limit=2", "--max_new_tokens=4", "--out_dir=eval"]),
    "bench": ("tools.bench", ["--tiny", "--device=cpu", "--num_seqs=4", "--group_size=2", "--prompt_len=8",
                              "--max_new_tokens=4", "--micro_batch_size=4", "--num_minibatches=1"]),
    "explain": ("tools.explain", ["--tiny", "--prompts=1", "--group_size=4", "--show=1", "--steps=1",
                                  "--out=explain/e.html", "--png=none"]),
    "compare": ("tools.compare", ["--logs_only", "--algos=grpo", "--seeds=1", "--out_dir=logs"]),
    "ablations": ("tools.ablations", ["--logs_only", f"--metrics={ROOT}/docs/course/ablations.jsonl",
                                      "--figure=abl.png", "--out_dir=abl"]),
    "exercise": ("tools.exercise", ["--trainers=grpo", "--out_dir=exercises"]),
    "token_lengths": ("tools.token_lengths", ["--tokenizer=TINY_DIR", "--data_path=tinydata"]),
    "memory": ("tools.memory", ["grpo", "--shape=tiny", "--device=cpu"]),
    "lock": ("tools.lock", []), "diffguide": ("tools.diffguide", []),  # no Config: their argv is drawn below
})
CONFIGS = [e for e in ENTRIES if e not in ("memory", "lock", "diffguide")]  # the entry points config.parse reads
NEVER = {"compare": {"logs_only"}, "ablations": {"logs_only"}}  # off, each runs every trainer: not a small run
# flags that ask for more work: a huge value is a long run, not a fault, so runs take them up to LONG_CAP (the parse
# test still drives them with huge values, which must fit int64)
LONG = {"num_steps", "batch_prompts", "group_size", "eval_problems", "num_questions", "limit", "num_samples",
        "repeats", "prompts", "steps", "num_seqs", "max_sampling_rounds", "seeds"}
LONG_CAP = 16


def module(entry):
    return importlib.import_module(ENTRIES[entry][0])


def script(entry):
    """The name its one-line errors start with: 'grpo.py', 'bench.py'."""
    return ENTRIES[entry][0].rpartition(".")[2] + ".py"


def fields(entry):
    """{flag: type} of an entry point: its Config's fields; memory's own options (it has no Config) and grpo's."""
    mod = module(entry)
    if entry != "memory":
        return {f.name: (f.type if isinstance(f.type, type) else eval(f.type)) for f in dataclasses.fields(mod.Config)}
    opts = next(n.value for n in ast.walk(ast.parse(inspect.getsource(mod.main)))
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "opts")  # opts = dict(gpus=...)
    return {**fields("grpo"), **{k.arg: str for k in opts.keywords}}


def declared(entry, name):
    """Flag texts at a field's declared edges: its range's ends and their neighbours ('in [1, inf)': 1.0, 0.0, 2.0,
    1), its choices ('in {a, b}') and look-alikes of them (upper case with a space, full-width)."""
    doc = config._field_docs(module("grpo" if entry == "memory" else entry).Config).get(name, "")
    m = re.search(r"\bin [\[(]\s*([^,]+?)\s*,\s*([^\])]+?)\s*[\])]", doc)
    ends = [] if not m else [t for x in m.groups() if "inf" not in x
                             for v in (float(x),) for t in (repr(v), repr(v - 1), repr(v + 1), str(int(v)))]
    m = re.search(r"\bin \{([^}]*)\}", doc)
    choices = [c.strip() for c in m.group(1).split(",")] if m else []
    return ends + choices + [c.upper() + " " for c in choices] + [c.translate(FULLWIDTH) for c in choices]


# -----------------------------------------------------------------------------
# hostile values: numbers at and past every edge, odd text (argv can carry lone surrogates: undecodable bytes),
# paths that are files, dirs, links, read-only or unwritable, malformed and unknown arguments

FULLWIDTH = {c: c + 0xFEE0 for c in range(0x21, 0x7F)}
NUMBERS = ["0", "-0", "1", "-1", "2", "0.5", "-0.0", "1e-9", "nan", "-nan", "NaN", "inf", "-inf", "Infinity", "1e308",
           "-1e308", "1e309", "1e38", "1e30", "1e31", "4.9e-324", "1e-400", str(2**31), str(INT64), str(INT64 + 1),
           str(2**64), str(10**30), str(-INT64 - 2), "184467440737096", "1e18", "9" * 5000, "\uff11\uff12", "\u0663",
           "1_000", " 7 ", "0x10", "1e3", "3.5", "", " ", "1,000", "\u22121", "\u00bd"]
TEXTS = ["", " ", "tiny", "none", "all", "x" * 600, "\u202eevil", "a\u200db", "\uff46\uff55\uff4c\uff4c", "\udcff",
         "a\udce9b", "new\nline", "tab\tx", "--seed=5", "-1", "\U0001f642", "\u0301", "\x7f", "'", '"', "{", "1,,2",
         ",", "%s%n", "$HOME", "~", "\u0627\u200f1"]
PATHS = ["file.txt", "dir", "link-file", "link-dir", "dangling", "ro", "ro/new", "file.txt/sub", "bin.dat",
         "empty.jsonl", "deep.json", "bad.jsonl", "/proc/version", "/proc/fuzz/x", "/dev/null", "n" * 300, "."]
BOOLS = ["true", "false", "1", "0", "yes", "off", "TRUE", "\uff54\uff52\uff55\uff45", "2", "", "nan", "\u0661"]
MALFORMED = ["--", "-", "--=1", "---seed=1", "seed=1", "--unknown_key=1", "--\uff53\uff45\uff45\uff44=1", "--seed =1",
             "--SEED=1", "--tiny=1=2", "\udcff", "--\u200bseed=1", "--seed", "-h"]
TOOL_ARGS = TEXTS + MALFORMED + ["--check", "--installed", "--torch=x", "check"]  # lock's and diffguide's argv


def workdir():
    """A fresh cwd holding a file, a dir, links to them and to nowhere, a read-only dir (root writes there too:
    PATHS adds /proc's), a binary file, an empty jsonl, a 100k-deep JSON array, a damaged jsonl, the tiny task's data
    and a finished run's log (compare reads it)."""
    d = tempfile.mkdtemp(prefix="fuzz-")
    for sub in ("dir", "ro", "tinydata", "logs/grpo-s0"):
        os.makedirs(os.path.join(d, sub))
    for name, data in [("file.txt", b"a file\n"), ("bin.dat", b"\xff\xfe\x00\x80"), ("empty.jsonl", b""),
                       ("deep.json", b"[" * 100_000), ("bad.jsonl", b'{"question": "q", "answer": \n'),
                       ("logs/grpo-s0/metrics.jsonl", b'{"step": 0, "eval/strict": 0.5, "eval/lenient": 0.5}\n')]:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    for split in ("train", "test"):
        with open(os.path.join(d, "tinydata", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in tiny.dataset(split)[:8])
    for link, target in [("link-file", "file.txt"), ("link-dir", "dir"), ("dangling", "nowhere")]:
        os.symlink(os.path.join(d, target), os.path.join(d, link))
    os.chmod(os.path.join(d, "ro"), 0o555)
    return d


def remove(d):
    os.chmod(os.path.join(d, "ro"), 0o755)
    shutil.rmtree(d)


@st.composite
def flag(draw, entry, work=False):
    """One --key=value of the entry point: a field and a hostile value for its type, or a malformed argument;
    work=True: a flag for a small run (LONG flags at most LONG_CAP, NEVER's left out, no malformed argument)."""
    types = {k: t for k, t in fields(entry).items() if not (work and k in NEVER.get(entry, ()))}
    if not work and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(MALFORMED))
    name = draw(st.sampled_from(sorted(types)))
    typ, edges = types[name], declared(entry, name)
    pool = {bool: BOOLS + TEXTS[:4], int: NUMBERS + edges, float: NUMBERS + edges}.get(typ, TEXTS + PATHS + edges)
    if work and name in LONG:
        pool = [v for v in pool if not re.fullmatch(r"\s*\d+\s*", v) or len(v) < 5 and int(v) <= LONG_CAP]
    value = draw(st.sampled_from(pool))
    return f"--{name}" if typ is bool and value == "" else f"--{name}={value}"


def small_run(entry):
    """The argv of a small run of `entry` with one hostile flag, or for lock and diffguide hostile arguments (never
    lock's refresh, which builds a venv; never diffguide's bare run or a lone --check, which rewrite or read docs/)."""
    if entry == "lock":
        return st.tuples(st.sampled_from(["check"] + TEXTS[:8]), st.lists(st.sampled_from(TOOL_ARGS), max_size=2)) \
            .map(lambda t: [t[0], *t[1]])
    if entry == "diffguide":
        return st.lists(st.sampled_from(TOOL_ARGS), min_size=1, max_size=2).filter(lambda a: set(a) != {"--check"})
    return flag(entry, work=True).map(lambda f: [*ENTRIES[entry][1], f])


# -----------------------------------------------------------------------------
# 1. parse: a Config the code can carry, or one line


@pytest.mark.parametrize("profile", PROFILES)
def test_flags_parse(profile):
    def prop(case):
        entry, argv = case
        mod = module(entry)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # --help prints, then exits 0
                cfg = config.parse(mod.Config, argv, tiny=getattr(mod, "TINY", None))
        except config.UserError as e:
            assert str(e) and "\n" not in str(e), f"{entry} {argv}: not one line: {str(e)!r}"
            return
        except SystemExit as e:
            assert e.code == 0 and ("--help" in argv or "-h" in argv), (entry, argv, e.code)
            return
        for name, value in dataclasses.asdict(cfg).items():
            if isinstance(value, int) and not isinstance(value, bool):
                assert abs(value) <= INT64, f"{entry} {argv}: --{name}={value} accepted, beyond int64"
            if isinstance(value, float):
                assert value == value, f"{entry} {argv}: --{name}=nan accepted"
    cases = st.sampled_from(CONFIGS).flatmap(lambda e: st.tuples(st.just(e), st.lists(flag(e), min_size=1, max_size=3)))
    check(prop, cases, profile["parse"])


# -----------------------------------------------------------------------------
# 2. run: exit 0, or exit 2 and one line, in bounded time


class TimeUp(BaseException):
    """Raised by SIGALRM in a run past TIME_BOUND (a BaseException: no `except Exception` in the run swallows it)."""


def _time_up(signum, frame):
    raise TimeUp()


def vm_data():
    """This process's private writable memory in bytes (what RLIMIT_DATA bounds)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))


def run_in_process(entry, argv, cwd):
    """(outcome, stderr, traceback) of `python <entry> argv` in this process as its __main__ runs it, in `cwd`; the
    outcome is the exit status, 'timeout' or 'traceback'. stdout and stderr encode as Python's do under a UTF-8 locale
    (stdout strictly: a lone surrogate printed is an error), the hub is offline (no retries), and the run may take
    8 GiB more memory at most (a value that asks for more fails there, not in this machine's OOM killer)."""
    mod = module(entry)
    main = {"lock": lambda: mod.main(argv), "diffguide": lambda: sys.exit(mod.main(argv))}.get(
        entry, lambda: config.run(mod.main))
    err = io.BytesIO()
    out_text = io.TextIOWrapper(io.BytesIO(), "utf-8", "strict", write_through=True)
    err_text = io.TextIOWrapper(err, "utf-8", "backslashreplace", write_through=True)
    saved = (sys.argv, os.getcwd(), torch.get_num_threads(), resource.getrlimit(resource.RLIMIT_DATA),
             huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    hard = saved[3][1]
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + 8 * 2**30 if hard < 0 else min(vm_data() + 8 * 2**30, hard),
                                              hard))
    sys.argv = [script(entry), *argv]
    os.chdir(cwd)
    previous = signal.signal(signal.SIGALRM, _time_up)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    outcome, trace = 0, ""
    try:
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            main()
    except SystemExit as e:  # sys.exit("text") prints it and exits 1
        outcome = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except TimeUp:
        outcome = "timeout"
    except BaseException:
        outcome, trace = "traceback", traceback.format_exc(limit=-6)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv, cwd, threads, limit, huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        os.chdir(cwd)
        torch.set_num_threads(threads)
        resource.setrlimit(resource.RLIMIT_DATA, limit)
    stderr = err.getvalue().decode("utf-8", "replace")
    out_text.close(), err_text.close()
    return outcome, stderr, trace


PROGRESS = re.compile(r"\d+/\d+ \[|^\s*$")  # tqdm's bars, and blank lines (stderr split at \r as well as \n)


def assert_clean_exit(entry, argv, outcome, stderr, trace=""):
    """Exit 0, or exit 2 with exactly one stderr line `<script>: error: ...` (progress bars aside); no traceback."""
    said = f"{entry} {' '.join(map(repr, argv))}: "
    assert outcome != "traceback", said + "a traceback:\n" + trace
    assert outcome != "timeout", said + f"still running after {TIME_BOUND} s"
    assert outcome in (0, 2) and "Traceback" not in stderr, said + f"exit {outcome}\n{stderr[-3000:]}"
    if outcome == 2:
        lines = [line for line in re.split(r"[\r\n]", stderr) if not PROGRESS.search(line)]
        assert len(lines) == 1 and lines[0].startswith(f"{script(entry)}: error: "), said + f"not one line:\n{stderr}"


@pytest.mark.parametrize("profile", PROFILES)
def test_flags_run(profile, tiny_dir):
    def prop(case):
        entry, argv = case
        argv = [a.replace("TINY_DIR", tiny_dir) for a in argv]
        cwd = workdir()
        try:
            assert_clean_exit(entry, argv, *run_in_process(entry, argv, cwd))
        finally:
            remove(cwd)
    check(prop, st.sampled_from(sorted(ENTRIES)).flatmap(lambda e: st.tuples(st.just(e), small_run(e))),
          profile["run"])


@pytest.mark.parametrize("profile", PROFILES)
def test_flags_cli(profile, tiny_dir):
    """A few of those runs as commands: what an in-process run cannot show (argv decoded from bytes, the real
    stdout, imports from the script's own dir, the interpreter's last-resort traceback)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def prop(case):
        entry, argv = case
        argv = [a.replace("TINY_DIR", tiny_dir) for a in argv]
        name = ENTRIES[entry][0]
        cmd = [sys.executable, "-m", name] if name.startswith("tools.") else [sys.executable, f"{ROOT}/{name}.py"]
        cwd = workdir()
        try:
            p = subprocess.run([*cmd, *argv], cwd=cwd, env=env, capture_output=True, timeout=TIME_BOUND + 30)
            assert_clean_exit(entry, argv, p.returncode, p.stderr.decode("utf-8", "replace"))
        finally:
            remove(cwd)
    check(prop, st.sampled_from(sorted(ENTRIES)).flatmap(lambda e: st.tuples(st.just(e), small_run(e))),
          profile["cli"])


# -----------------------------------------------------------------------------
# 3. the answer parser: the intended number or no number, never a cut one or the wrong sign
#
# A number is drawn in a form the grammar reads (gsm8k.py: '1500', '1,500', '$1,500.25', '2.5e3', '3/4', '3 1/2',
# with '-' or U+2212), so its value is known; then made hostile: characters put inside it (separator look-alikes,
# operators, marks, blanks, other scripts' digits), its minus replaced by a look-alike or followed by an invisible
# mark, digits swapped for other scripts' digits of the same value, and junk before and after it.

DASHES = "".join(c for c in map(chr, range(0x2E80)) if unicodedata.category(c) == "Pd" and c != "-") + \
    "\u2796\u02d7\u207b\u208b\ufe63\uff0d"
# '#' is left out: the answer's marker parts numbers when a blank follows ('7 ### 18' reads 18, by design)
INSIDE = ("\uff0c\u066b\u066c\u2215\u2044\u00b7\u2027^+*'\u2032_~:;!?%&@|`\\\u02bc\u3001\u060c\ufe50\u2e41"  # glue
          "\u0301\u034f\ufe0f\u20e3\u200d\u200c\u200b\u2060\ufeff\u200e\u200f\u202e\u2066\u00ad"  # marks, invisibles
          " \u00a0\u2009\u202f\u3000\t\n"  # blanks
          "\uff15\u0665\u06f5\u096b\U0001d7d3\u00b2\u00bd\u2460\u2163")  # other scripts' digits and numerals
MARKS = "\ufe0f\u034f\u0301\u200b\u200d\u2060\u00a0\u2009\u202e\u180e"
OTHER_DIGITS = [0xFF10, 0x0660, 0x06F0, 0x0966, 0x1D7CE]  # zero of full-width, Arabic-Indic, Persian, Devanagari, math
BEFORE = ["", " ", "\u00a0", "\u200f", "\u202e", "**", "\uff04", "= ", "\u2248 ", "answer: ", "\u2060", "(", "\u3000"]
AFTER = ["", ".", "\u3002", "%", " dollars", "\u200f", "**", "\u20ac", "\u0301", "'", "\u2032", ")", "\n", " \u00b0C"]


@st.composite
def readable(draw):
    """(text, value): a number in one of the forms the grammar reads, and its exact value."""
    n, d = draw(st.integers(0, 10**7)), draw(st.integers(1, 999))
    text, value = draw(st.sampled_from([
        (str(n), Fraction(n)), (f"{n:,}", Fraction(n)), (f"{n}.{d:03d}", Fraction(f"{n}.{d:03d}")),
        (f".{d}", Fraction(f".{d}")), (f"{d}e{n % 7}", Fraction(d * 10 ** (n % 7))),
        (f"{n % 100}.5e{n % 4}", Fraction(f"{n % 100}.5") * 10 ** (n % 4)), (f"{n}/{d}", Fraction(n, d)),
        (f"{n % 50} {d % 7 + 1}/{d % 7 + 2}", n % 50 + Fraction(d % 7 + 1, d % 7 + 2))]))
    sign, dollar = draw(st.sampled_from(["", "-", "\u2212"])), draw(st.sampled_from(["", "$"]))
    return sign + dollar + text, -value if sign else value


@st.composite
def hostile(draw):
    """(completion, intended value, hostile?): a readable number, maybe made hostile, after '####'."""
    body, value = draw(readable())
    how = draw(st.sampled_from(["clean", "inside", "minus", "mark", "digits", "around"]))
    if how == "inside":  # 1 to 3 characters put strictly inside the number; not beside an exponent's e (a letter:
        # letters part numbers), and no blank after a leading point ('. 5' is a sentence's end, then 5)
        at = draw(st.sampled_from([i for i in range(1, len(body)) if "e" not in body[i - 1:i + 1]] or [0]))
        lead = body[:at].lstrip("-\u2212$") == "."
        junk = st.sampled_from([c for c in INSIDE if not (lead and c.isspace())])
        body = body[:at] + "".join(draw(st.lists(junk, min_size=1, max_size=3))) + body[at:]
    elif how == "minus":  # a minus look-alike the grammar does not read: the number is negative or unreadable
        body, value = draw(st.sampled_from(DASHES)) + body.lstrip("-\u2212"), -abs(value)
    elif how == "mark":  # a minus, then an invisible or combining mark
        body, value = "-" + draw(st.sampled_from(MARKS)) + body.lstrip("-\u2212"), -abs(value)
    elif how == "digits":  # ASCII digits swapped for another script's digits of the same value
        zero = draw(st.sampled_from(OTHER_DIGITS))
        swap = draw(st.lists(st.booleans(), min_size=len(body), max_size=len(body)))
        body = "".join(chr(zero + int(c)) if c.isdigit() and s else c for c, s in zip(body, swap))
    before, after = (draw(st.sampled_from(BEFORE)), draw(st.sampled_from(AFTER))) if how == "around" else ("", "")
    lead = draw(st.sampled_from(["", "3+4=7 so 7*2=14\n", "Step 1. 12 - 5 = 7.\n"]))
    return f"{lead}#### {before}{body}{after}", value, how != "clean"


@pytest.mark.parametrize("profile", PROFILES)
def test_answer_is_the_intended_number_or_none(profile):
    def prop(case):
        text, value, is_hostile = case
        intended = gsm8k.Number.of(value)
        strict, lenient = gsm8k.extract_answer(text), gsm8k.extract_last_number(text)
        assert strict in (None, intended), f"{text!r}: read {strict}, meant {intended} (or no number)"
        assert lenient in (None, intended), f"{text!r}: lenient read {lenient}, meant {intended} (or no number)"
        assert is_hostile or strict == lenient == intended, f"{text!r}: read {strict}, {lenient}; meant {intended}"
        # the rewards: against the intended gold as read; against a cut piece or the other sign, never
        tail = text.rpartition("####")[2]
        pieces = {Fraction(p) for p in re.findall(r"[0-9]+(?:\.[0-9]+)?", tail)} | {-value, abs(value)}
        for gold in pieces | {value}:
            reward = gsm8k.correctness_reward(text, f"#### {gsm8k.Number.of(gold)}")
            assert reward == float(strict == gold == value), f"{text!r}: rewarded {reward} against gold {gold}"
    check(prop, hostile(), profile["answer"])
