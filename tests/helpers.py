"""
helpers.py: what the tests share. Fixtures live in conftest.py; this module is imported by the tests and by the
scripts tests/launch/ starts under torchrun.

    ROOT, SHARED_GSM8K, F64                the repository, real GSM8K rows (tests skip without them), float64
    EXERCISES                              $GRPO_EXERCISES: a dir of student copies the trainers import from
    single_process, run, torchrun          a one-process Dist; a command from the root (the running interpreter);
                                           a CPU torchrun launch
    run_main, cli_error, fails             a script's main() in this process; its one-line error, exit 2, in this
                                           process and as a command
    constructed_rollout, constructed_sampler   completions written out, not sampled: the same on any build of
                                           the tiny model, with a reward spread in every group (or none, asked)
    OLD, NEW, REF, REWARDS, padded, toy, value_and_dj   the spec's shared toy batch (ALGORITHMS.md §0.3)
    T11, ADV11, toy11, assert_finite_differences        section 11's toy batch; dJ/dlogπ against differences
    assert_same_run                        two runs' logs agree: sampled quantities exactly, the rest to rounding
    ddp_batch, ddp_setup                   a fixed batch, and the policy and stale log-probs of a DDP check
"""
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# GRPO_EXERCISES=<dir>: the trainers are imported from a student's copies there (python -m tools.exercise), so the
# spec tests grade them; the plumbing still comes from ROOT
EXERCISES = os.environ.get("GRPO_EXERCISES", "")
if EXERCISES:
    if not os.path.isdir(EXERCISES):
        raise SystemExit(f"GRPO_EXERCISES={EXERCISES} is not a directory: point it at the copies tools.exercise wrote")
    sys.path.insert(0, os.path.abspath(EXERCISES))
# real GSM8K rows ({train,test}.jsonl) for the tests that need them; those tests skip where the files are absent
SHARED_GSM8K = os.environ.get("GSM8K_DIR") or os.path.join(ROOT, "..", "shared", "data", "gsm8k")

from grpo_family import config, distributed, gsm8k, loading, logprobs, rollout, tiny  # noqa: E402

F64 = torch.float64

# -----------------------------------------------------------------------------
# running things


def single_process():
    """A Dist for one CPU process."""
    return distributed.Dist(False, 0, 0, 1, torch.device("cpu"), True)


def run(cmd, timeout=900, env=None):
    """Run a command from the repo root; fail the test with its output if it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


def cli_error(module, argv, capsys, monkeypatch):
    """`python <module>.py argv` run in process through config.run (as its __main__ does): assert exit
    status 2 and exactly one stderr line, no traceback; return that line."""
    script = module.__name__.rsplit(".", 1)[-1] + ".py"  # tools.memory runs as .../tools/memory.py
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()  # what ran before in this test is not this command's output
    with pytest.raises(SystemExit) as exc:
        config.run(module.main)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == 2, (exc.value.code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err[-3000:]
    return lines[0]


def run_main(module, argv, monkeypatch):
    """`python <module>.py argv` in this process (its main(), as config.run calls it when the run ends well)."""
    monkeypatch.setattr(sys, "argv", [module.__name__.rsplit(".", 1)[-1] + ".py", *argv])
    module.main()


def fails(argv, *words, script="grpo.py"):
    """Run `script argv` (a tool as `python -m tools.<name>`); assert exit status 2 and one stderr line, no
    traceback, naming every word."""
    tool = script.startswith("tools/")
    cmd = [sys.executable, "-m", script[:-3].replace("/", ".")] if tool else [sys.executable, script]
    p = subprocess.run([*cmd, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, f"exit {p.returncode}, expected 2\n{p.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith(f"{os.path.basename(script)}: error: "), p.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def torchrun(nproc, *args):
    """The argv of a CPU torchrun launch with `nproc` gloo processes, on a port free now (each launch its own: a port
    a failed launch left in use cannot fail the next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master-port={port}", *args]


# -----------------------------------------------------------------------------
# completions written out, not sampled: a test that needs a gradient, a reward spread or a particular completion
# constructs it, because the tiny model's build (and so what it samples) differs from one CPU to another


def written_completions(problem, group_size, flat=False):
    """G completion texts for a tiny (or GSM8K-style) problem: the right solution, a wrong one that stops after its
    first step, the right number without the '####' line, and longer or shorter variants of those, so rewards
    differ within the group and lengths differ across it; flat=True: G copies of the first step's wrong answer
    (an all-equal group, which the trainers must handle: Â = 0, DAPO's filter, no DPO pair)."""
    lines = problem["answer"].splitlines()
    steps, final = [l for l in lines if "=" in l], gsm8k.extract_answer(problem["answer"])
    first = steps[0].split("=")[1] if steps else "0"
    variants = ["\n".join(steps) + f"\n#### {final}",                     # right, well formed
                steps[0] + f"\n#### {first}" if steps else "#### 0",       # stops early: wrong
                "\n".join(steps) + f"\nThe answer is {final}.",          # right number, no '####'
                f"#### {final}",                                         # right, no working
                "\n".join(steps + steps) + f"\n#### {final}"]            # right, longer
    if flat:
        return [variants[1]] * group_size
    return [variants[k % len(variants)] for k in range(group_size)]


def constructed_rollout(tok, problems, group_size, max_new_tokens, system_prompt="", device="cpu", flat=()):
    """A Rollout as rollout.sample returns it, with written_completions for the problems (those whose question is in
    `flat` all equal), truncated at max_new_tokens; the sampler's log-probs are left at 0 (none drew them)."""
    prompts = [gsm8k.build_prompt(tok, p["question"], system_prompt) for p in problems]
    ids, mask = rollout.tokenize_prompts(tok, prompts, torch.device(device))
    texts = [t for p in problems for t in written_completions(p, group_size, p["question"] in flat)]
    eos = tok.eos_token_id
    rows = [(tok(t, add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens] for t in texts]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    r = rollout.make_rollout(tok, ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0),
                             out.to(ids.device), [eos], torch.zeros(out.shape, device=ids.device))
    r.answers = [p["answer"] for p in problems for _ in range(group_size)]
    return r


def constructed_sampler(flat=()):
    """A stand-in for rollout.sample (same arguments) that returns constructed_rollout: what a trainer's step sees
    is then the same on every build of the tiny model."""
    def sample(model, tok, problems, cfg, device):
        return constructed_rollout(tok, problems, cfg.group_size, cfg.max_new_tokens, cfg.system_prompt, device, flat)
    return sample


# -----------------------------------------------------------------------------
# two runs that must agree (DDP and --fsdp)

SAMPLED = ("reward", "accuracy", "response_length", "truncated", "zero_std_groups", "eval/strict", "eval/lenient")


def assert_same_run(name, a, b):
    """Two runs' logged metrics (by step, as JSON keys): sampled quantities equal, the rest equal to fp32 rounding."""
    assert sorted(a) == sorted(b) == ["0", "1", "2"], (name, sorted(a), sorted(b))
    for step in a:
        assert sorted(a[step]) == sorted(b[step]), (name, step)
        for key, x in a[step].items():
            y = b[step][key]
            if key.startswith("time"):  # wall-clock seconds: the one thing two runs need not share
                continue
            if x is None or y is None:  # nothing counted (logged as null): it must be so in both runs
                assert x is y, (name, step, key, x, y)
            elif key in SAMPLED or key.startswith(("eval/", "filtered")):
                assert x == y, (name, step, key, x, y)
            else:
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (name, step, key, x, y)


# -----------------------------------------------------------------------------
# the spec's shared toy batch (ALGORITHMS.md §0.3): G = 4, rewards [1, 0, 0, 1], population-std Â = [1, -1, -1, 1]

OLD = [[-1.0, -0.5], [-1.2, -0.8, -2.0], [-0.3], [-2.0, -1.0]]
NEW = [[-0.9, -0.2], [-1.5, -0.8, -1.8], [-0.1], [-2.2, -0.7]]
REF = [[-1.1, -0.4], [-1.0, -0.9, -2.1], [-0.4], [-2.1, -1.2]]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def padded(rows, fill=0.0):
    """Right-pad ragged rows into a (B, T) float64 tensor and its float64 mask."""
    T = max(len(r) for r in rows)
    t = torch.full((len(rows), T), fill, dtype=F64)
    m = torch.zeros(len(rows), T, dtype=F64)
    for i, r in enumerate(rows):
        t[i, :len(r)] = torch.tensor(r, dtype=F64)
        m[i, :len(r)] = 1
    return t, m


def toy():
    """(new (requires grad), old, ref, mask, rewards) as float64 tensors; each pads with its own junk value,
    so a loss that reads the padding shows it."""
    new, mask = padded(NEW, fill=-7.0)
    old, _ = padded(OLD, fill=3.0)
    ref, _ = padded(REF, fill=-5.0)
    return new.requires_grad_(True), old, ref, mask, torch.tensor(REWARDS, dtype=F64)


def value_and_dj(loss, new):
    """(loss value, dJ/dlogπ per token): backward, then the negated gradient of the loss w.r.t. `new`."""
    loss.backward()
    return loss.item(), -new.grad


# -----------------------------------------------------------------------------
# the toy batch of ALGORITHMS.md section 11 (the newer methods): one group, G = 4, pads hold 0.0

T11 = {"R": [1.0, 0.0, 0.0, 0.0], "A": [1.0, -0.5, -1.0, 0.5],
       "new": [[-0.3, -1.2, -0.05], [-2.0, -0.4, -0.9, -1.5], [-0.1, -0.7], [-0.2, -3.0, -0.6, -0.9]],
       "old": [[-0.6, -1.0, -0.5], [-1.5, -0.5, -0.3, -1.6], [-0.2, -0.2], [-0.25, -2.5, -0.65, -1.0]],
       "ref": [[-0.5, -1.1, -0.2], [-1.8, -0.6, -0.5, -1.4], [-0.3, -0.4], [-0.3, -2.8, -0.7, -0.8]],
       "mu": [[-0.65, -0.9, -0.45], [-1.4, -0.2, -1.1, -1.6], [-1.5, -0.25], [-0.2, -1.7, -0.7, -1.1]]}
# its "ADV" batch: 3 prompts x G = 4 (q3 all wrong); lengths as in the spec, the reward on the last token
ADV11 = {"R": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
         "lengths": [3, 4, 2, 4, 2, 3, 4, 1, 4, 2, 3, 3]}


def toy11():
    """(new (requires grad), old, ref, mu, mask, R, Â) of section 11's toy as float64 (B, 4) tensors."""
    new, mask = padded(T11["new"])
    old, ref, mu = (padded(T11[k])[0] for k in ("old", "ref", "mu"))
    return (new.requires_grad_(True), old, ref, mu, mask, torch.tensor(T11["R"], dtype=F64),
            torch.tensor(T11["A"], dtype=F64))


def assert_finite_differences(dj, new, objective, h=1e-6, tol=1e-8, jump=None):
    """dJ/dlogπ (B, T) against central finite differences of objective(rows) on ragged `new` (python floats), token
    by token, and 0 on the padding; with `jump`, a difference above it (a mask or clip boundary crossed) is skipped."""
    for i in range(len(new)):
        assert dj[i, len(new[i]):].abs().sum() == 0
        for t in range(len(new[i])):
            up = [row[:] for row in new]
            dn = [row[:] for row in new]
            up[i][t] += h
            dn[i][t] -= h
            fd = (objective(up) - objective(dn)) / (2 * h)
            if jump is None or abs(fd) < jump:
                assert dj[i, t].item() == pytest.approx(fd, abs=tol), (i, t)


# -----------------------------------------------------------------------------
# a fixed batch of written completions (LoRA and PPO checks, tests/launch/fsdp_update.py)


def ddp_batch(tok, n=8):
    """Deterministic prompts + completions of different lengths: (prompt ids, mask, completion ids, mask)."""
    rows = tiny.dataset("test")[:n]
    ids, mask = rollout.tokenize_prompts(tok, [gsm8k.build_prompt(tok, r["question"], "") for r in rows],
                                        torch.device("cpu"))
    comps = [r["answer"] if i % 3 else r["answer"].split("\n")[0] for i, r in enumerate(rows)]
    enc = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in comps]
    T = max(len(e) for e in enc)
    cids = torch.full((n, T), tok.pad_token_id)
    cmask = torch.zeros(n, T, dtype=torch.long)
    for i, e in enumerate(enc):
        cids[i, :len(e)] = torch.tensor(e)
        cmask[i, :len(e)] = 1
    return ids, mask, cids, cmask


def ddp_setup():
    """(d, batch, base policy, stale old log-probs, ref log-probs) for a DDP check on the tiny model."""
    d = distributed.setup()
    assert d.ddp and d.world_size == 2, "run me with torchrun --nproc_per_node=2"
    path = tiny.ensure_model(d, log=lambda *a: None)
    batch = ddp_batch(loading.tokenizer(path))
    base = logprobs.Policy(loading.model(path, d.device))
    with torch.no_grad():
        old_logp, _ = base(*batch)
        old_logp = old_logp + 0.15 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(0))
    return d, batch, base, old_logp, old_logp + 0.1


