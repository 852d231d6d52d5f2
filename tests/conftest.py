"""Shared test helpers: paths and subprocess runs, the spec's toy batch, and the 2-process DDP check's
setup and closing block (the tests/ddp_*_check.py scripts import them when torchrun launches them)."""
import copy
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# real GSM8K rows ({train,test}.jsonl) for the tests that need them; those tests skip where the files are absent
SHARED_GSM8K = os.environ.get("GSM8K_DIR") or os.path.join(ROOT, "..", "shared", "data", "gsm8k")

from grpo_family import config, distributed, gsm8k, loading, logprobs, rollout, tiny

F64 = torch.float64

# -----------------------------------------------------------------------------
# running things


def single_process():
    """A Dist for one CPU process."""
    return distributed.Dist(False, 0, 0, 1, torch.device("cpu"), True)


@pytest.fixture(scope="session")
def tiny_dir():
    """The warm-started tiny model (built once per cache, then loaded from disk)."""
    return tiny.ensure_model(single_process(), log=lambda *a: None)


def run(cmd, timeout=900, env=None):
    """Run a command from the repo root; fail the test with its output if it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def cli_error(module, argv, capsys, monkeypatch):
    """`python <module>.py argv` run in process through config.run (as its __main__ does): assert exit
    status 2 and exactly one stderr line, no traceback; return that line."""
    script = module.__name__.rsplit(".", 1)[-1] + ".py"  # tools.memory runs as .../tools/memory.py
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        config.run(module.main)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == 2, (exc.value.code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), err[-3000:]
    return lines[0]


def torchrun(nproc, *args):
    """The argv of a CPU torchrun launch with `nproc` gloo processes, on a port of its own."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master-port={29500 + os.getpid() % 1000}", *args]


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
# the 2-process DDP checks (tests/ddp_*_check.py, launched by torchrun)


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


def ddp_copies(base):
    """(a single-process copy, a DDP-wrapped copy) of `base`, both in train mode."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return copy.deepcopy(base).train(), DDP(copy.deepcopy(base).train())


def ddp_finish(d, base, single, model):
    """Assert that the DDP update equals the single-process one (and did something); print; tear down."""
    worst = max((a - b).abs().max().item() for a, b in zip(single.parameters(), model.module.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(base.parameters(), model.module.parameters()))
    assert moved > 1e-3, f"the update did nothing (max change {moved})"
    assert worst < 1e-5, f"rank {d.rank}: DDP update differs from single-process update by {worst}"
    distributed.check_replicas(model.module, torch.optim.SGD(model.parameters(), lr=0), d)
    print(f"rank {d.rank}: DDP update == single-process update (max diff {worst:.2e}, max change {moved:.2e})")
    distributed.cleanup(d)


# rows 0, 3 and 6 of ddp_batch are one-line answers: rank 0 gets them, rank 1 the long ones
TOKEN_SHARES = {0: [0, 3, 6, 1], 1: [2, 4, 5, 7]}


def ddp_token_mean_check(out_path, make_adv, loss_fn):
    """A token-mean trainer's step 6 (all_reduce_sum of the token count, the loss times the world size, micro-batches
    with no_sync) on two shares of very different token counts, against the single-process update on the whole batch
    and a naive per-rank token mean; writes the measurements to out_path (rank 0) and tears down.
    loss_fn(logp, old_logp, ref_logp, adv, mask, num_tokens) -> (loss, stats); make_adv() -> (B,) advantages."""
    d, batch, base, old_logp, ref_logp = ddp_setup()
    adv = make_adv()
    single, model = ddp_copies(base)
    _, naive = ddp_copies(base)

    def update(policy, rows, dd, micro, per_rank=False):
        ids, mask, cids, cmask = batch
        local = cmask[rows].sum().float()
        num_tokens = local if per_rank else distributed.all_reduce_sum(local.clone(), dd).clamp_min(1)
        parts = torch.tensor(rows).split(micro)
        for k, ix in enumerate(parts):
            with nullcontext() if (not dd.ddp or k == len(parts) - 1) else policy.no_sync():
                logp, _ = policy(ids[ix], mask[ix], cids[ix], cmask[ix])
                loss, _ = loss_fn(logp, old_logp[ix], ref_logp[ix], adv[ix], cmask[ix], num_tokens)
                (loss if per_rank else loss * dd.world_size).backward()
        torch.optim.SGD(policy.parameters(), lr=1.0).step()

    update(single, list(range(8)), distributed.Dist(False, 0, 0, 1, d.device, True), 3)
    update(model, TOKEN_SHARES[d.rank], d, 2)
    update(naive, TOKEN_SHARES[d.rank], d, 2, per_rank=True)

    def max_diff(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        _, stats = loss_fn(base(*batch)[0], old_logp, ref_logp, adv, batch[3], 1.0)
    res = {f"tokens_rank{d.rank}": int(batch[3][TOKEN_SHARES[d.rank]].sum()),
           "clip_frac": (stats["clip_frac"][0] / stats["clip_frac"][1]).item(),
           "max_change": max_diff(single, base), "ddp_vs_single": max_diff(model.module, single),
           "naive_vs_single": max_diff(naive.module, single)}
    parts = distributed.all_gather_objects(res, d)
    if d.master_process:
        with open(out_path, "w") as f:
            json.dump({**parts[1], **parts[0]}, f, indent=1)
    ddp_finish(d, base, single, model)  # asserts DDP == single process, checks the replicas, tears down
