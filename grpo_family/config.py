"""
config.py: the command line of every script. A typed dataclass of settings at the top of the script, overridden by
--key=value flags, checked against the ranges its comments declare; and the one-line error of a user's mistake.

    UserError       a mistake the user can fix: one line on stderr, exit status 2, no traceback
    run             run a script's main(): UserError -> exit 2; a failed collective -> one line naming the rank
    same_on_every_rank  marks the UserErrors of a setup step every process of a machine meets alike (flags, data,
                    model, run dir), so that run() lets the machine's first process alone say it under torchrun
    parse           defaults, then --tiny's overrides, then the flags; every value checked against its range and
                    against what the code can carry (int64; finite floats of magnitude <= 1e30)
    help_text       the --help text: every field with its type, default, --tiny value and comment
    run_name        the name of the file that defines a Config: "grpo" for grpo.Config
"""
import dataclasses
import functools
import inspect
import os
import re
import sys

from grpo_family import distributed, fsdp, gsm8k


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, a file): reported in one line, exit status 2."""


def run(main):
    """Run a script's main(): a UserError prints `script: error: message` on stderr and exits 2, no traceback; a
    collective that timed out or lost a peer prints one line naming this rank, the last step done and where (exit 1)."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except (UserError, gsm8k.DataError) as e:
        if not (getattr(e, "every_rank", False) and int(os.environ.get("LOCAL_RANK", 0))):  # torchrun: said once
            print(f"{script}: error: {e}", file=sys.stderr, flush=True)  # per machine, by its local rank 0
        distributed.leave(2)
    except RuntimeError as e:
        why = distributed.collective_failure(e)
        if why is None:
            raise
        print(f"{script}: error: {why}", file=sys.stderr, flush=True)
        distributed.leave(1)
    if distributed.joined():  # a process group's member leaves through os._exit (distributed.leave says why)
        distributed.leave(0)


def same_on_every_rank(fn):
    """fn, with the UserError (and DataError) it raises marked every_rank: a setup step whose inputs are the same on
    every process of a machine (the flags, the files it reads), so each meets the same mistake and one line says it
    (local rank 0's; a file missing on one machine only is still said by that machine)."""
    @functools.wraps(fn)
    def marked(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, gsm8k.DataError) as e:
            e.every_rank = True
            raise
    return marked


def _field_docs(cls):
    """Map each dataclass field to the comment on its line (`name: type = default  # doc`)."""
    found = (re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s*(.*)$", l) for l in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def _valid_values(doc):
    """The range a field's comment declares: 'in [1, inf)', 'in (0, 1]' -> a test; 'in {a, b}' -> the choices."""
    num = r"(-?(?:inf|\d+(?:\.\d+)?(?:e-?\d+)?))"
    m = re.search(r"\bin ([\[(])\s*" + num + r"\s*,\s*" + num + r"\s*([\])])", doc)
    if m:
        lo, hi, closed_lo, closed_hi = float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"
        return m.group(0)[3:], lambda v: (lo <= v if closed_lo else lo < v) and (v <= hi if closed_hi else v < hi)
    m = re.search(r"\bin \{([^}]*)\}", doc)
    if m:
        choices = [c.strip() for c in m.group(1).split(",")]
        return "{" + ", ".join(choices) + "}", lambda v: v in choices
    return None, None


# What the code can carry: integers go into int64 tensors and generators; floats into float32 arithmetic, where a
# flag is multiplied by up to a few orders of magnitude (AdamW's step lr / (1 - β1^t) is 10 lr at step 1).
INT_LIMIT = 2**63 - 1
FLOAT_LIMIT = 1e30  # float32 holds up to 3.4e38


def _representable(name, value, shown):
    """The one-line complaint about a number the code cannot compute with, or None: an int beyond int64, nan, or inf
    (which passes only where the field's declared range is closed at inf). Magnitudes: see parse."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return None if abs(value) <= INT_LIMIT else f"--{name}={value} does not fit a 64-bit integer"
    if value != value:
        return f"--{name}=nan is not a number: give a finite value" + (f" in {shown}" if shown else "")
    if abs(value) == float("inf"):
        return None if shown and shown.endswith("inf]") and value > 0 else \
            f"--{name}={value} is not finite: give a finite value" + (f" in {shown}" if shown else "")
    return None


def _parse_value(name, typ, text):
    """Convert the command-line text for field `name` to its declared type, or raise UserError."""
    if typ is bool:
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise UserError(f"--{name} expects a boolean (true/false), got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    try:
        return typ(text)  # int, float or str
    except ValueError:
        raise UserError(f"--{name} expects {'an integer' if typ is int else 'a number'}, got {text!r}") from None


def help_text(cls, tiny=None):
    """The --help text: every field with its type, default, --tiny value and comment."""
    docs = _field_docs(cls)
    script = os.path.abspath(sys.argv[0])
    tool = os.path.basename(os.path.dirname(script)) == "tools"  # run as python -m tools.<name>
    command = f"python -m tools.{os.path.splitext(os.path.basename(script))[0]}" if tool else \
        f"python {os.path.basename(script)}"
    lines = [f"usage: {command} [--key=value ...]", "", "options:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" (--tiny: {tiny[f.name]!r})" if tiny and f.name in tiny else ""
        lines.append(f"  --{f.name}={default!r}  [{f.type.__name__}]{extra}  {docs.get(f.name, '')}")
    return "\n".join(lines)


@same_on_every_rank  # every process of a torchrun launch parses the same flags
def parse(cls, argv=None, tiny=None):
    """Build cls from defaults, then the `tiny` overrides if --tiny is given, then --key=value flags; every
    value is checked against the range its field's comment declares. Raises UserError."""
    return _parse(cls, argv, tiny)


def _parse(cls, argv, tiny):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, tiny))
        sys.exit(0)
    types = {f.name: (f.type if isinstance(f.type, type) else eval(f.type)) for f in dataclasses.fields(cls)}
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in types:
            raise UserError(f"unknown config key --{key}. Valid keys: {', '.join(sorted(types))}")
        if not eq:
            if types[key] is not bool:
                raise UserError(f"--{key} needs a value: --{key}=...")
            text = "true"
        given[key] = _parse_value(key, types[key], text)
    values = dict(tiny) if given.get("tiny", False) and tiny else {}
    values.update(given)  # explicit flags win over --tiny
    cfg = cls(**values)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):  # every number, declared range or not: one the code can carry
        if (why := _representable(f.name, getattr(cfg, f.name), _valid_values(docs.get(f.name, ""))[0])):
            raise UserError(why)
    for name, doc in docs.items():
        shown, ok = _valid_values(doc)
        if ok is not None and not ok(getattr(cfg, name)):
            raise UserError(f"--{name}={getattr(cfg, name)!r} is out of range: it must be in {shown}")
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and FLOAT_LIMIT < abs(v) < float("inf"):
            raise UserError(f"--{f.name}={v:g} is too large for float32 arithmetic: give a value of magnitude at most "
                            f"{FLOAT_LIMIT:g}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes: each takes an equal share of the batch
    if hasattr(cfg, "batch_prompts") and (cfg.batch_prompts % world or
                                          cfg.batch_prompts // world * cfg.group_size % cfg.num_minibatches):
        raise UserError(f"--batch_prompts={cfg.batch_prompts} must split over the {world} process(es), and each one's "
                        f"completions (x --group_size={cfg.group_size}) into --num_minibatches={cfg.num_minibatches}")
    if getattr(cfg, "fsdp", False) and (why := fsdp.refusal(cfg, "RANK" in os.environ, run_name(cls))):
        raise UserError(why)
    if getattr(cfg, "rollout_correction", "").endswith("mask") and not cfg.rc_min < cfg.rc_max:
        raise UserError(f"--rc_min={cfg.rc_min} must be below --rc_max={cfg.rc_max}: tokens with ρ in between are kept")
    if hasattr(cfg, "run_dir") and not cfg.run_dir and not getattr(cfg, "resume", ""):  # as CleanRL's exp_name
        cfg.run_dir = os.path.join("runs", run_name(cls) + ("-tiny" if cfg.tiny else ""))
    return cfg


def run_name(cls):
    """The name of the file that defines `cls`: 'grpo' for grpo.Config, also when run as __main__."""
    return os.path.splitext(os.path.basename(inspect.getfile(cls)))[0]
