"""Distributed training is really distributed: every trainer on 2 gloo processes on the CPU, in two torchrun
launches (tests/launch/): the tiny default for two steps on two ranks, ending in the replica check, with --fsdp
beside DDP; and each trainer's own step as two DDP ranks against one process holding the whole batch, gradient for
gradient. Then what needs processes of its own, each saying why."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from grpo_family import distributed, loading
import eval_gsm8k
from helpers import ROOT, assert_same_run, run, run_main, torchrun
from tools import trainers


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    """tests/launch/two_ranks.py: every trainer's two-rank run, and the --fsdp and DDP pair of all but dpo.py."""
    out = tmp_path_factory.mktemp("two_ranks")
    run(torchrun(2, "tests/launch/two_ranks.py", str(out)), timeout=2400)
    return out, json.load(open(out / "report.json"))


@pytest.fixture(scope="module")
def ddp_updates(tiny_dir, tmp_path_factory):
    """tests/launch/ddp_updates.py: every trainer's DDP gradients against one process's."""
    out = tmp_path_factory.mktemp("ddp_updates") / "report.json"
    run(torchrun(2, "tests/launch/ddp_updates.py", str(out)), timeout=1200)
    return json.load(open(out))


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_every_trainer_trains_on_two_ranks(two_ranks, name):
    """Two steps of the tiny default on two gloo ranks (each trainer's own two-rank option, two_ranks.VARIANTS).
    The run ended with distributed.check_replicas, which raises unless both ranks hold the same weights and took the
    same optimizer steps; every rank saved its RNG state."""
    out, report = two_ranks
    m = report[name]["smoke"]
    assert sorted(m) == ["0", "1", "2"] and "eval/strict" in m["0"] and "eval/strict" in m["2"]
    assert all(math.isfinite(m[s]["loss"]) and math.isfinite(m[s]["grad_norm"]) for s in ("1", "2"))
    assert os.path.isfile(out / f"{name}-smoke" / "ckpt-000002" / "rng_rank1.pt")
    if name == "gtpo":  # the 75th percentile of every rank's entropies so far: about a quarter filtered, one cut
        assert 0.2 <= m["1"]["filtered_frac"] <= 0.3 and m["1"]["ent_threshold"] < 1e9
    if name == "gfpo":  # adaptive difficulty: k per prompt from its bucket, between 4 and 8 of 8
        assert all(4 <= m[s]["keep"] <= 8 for s in ("1", "2"))
    if name == "dapo":
        assert all(m[s]["sampling_rounds"] >= 1 and m[s]["kl"] >= 0 for s in ("1", "2"))


@pytest.mark.parametrize("name", [n for n in trainers.TRAINERS if n != "dpo"])
def test_every_trainer_under_fsdp_equals_its_ddp_run(two_ranks, name):
    """Two steps on written-out completions with --fsdp and with DDP from the same start: the same rewards and
    held-out answers, the same losses to rounding, the same weights (PPO: and critic) to 1e-6, a gradient in both
    steps. Tolerances: a sharded run sums the same fp32 numbers in another order (gradients reduce-scattered per
    micro-batch, the clip norm reduced over shards), so weights agree to rounding, not bit for bit."""
    _, report = two_ranks
    r = report[name]
    assert r["weight_diff"] < 1e-6, (name, r["weight_diff"])
    assert_same_run(name, r["ddp"], r["fsdp"])
    assert all(r["fsdp"][s]["grad_norm"] > 0 for s in ("1", "2"))


def test_the_reference_model_is_sharded_and_used(two_ranks):
    """grpo's default β = 0.04: the KL to the (sharded) reference is logged, and equals DDP's (unsharded) one."""
    _, report = two_ranks
    kl = [report["grpo"][m]["2"]["kl"] for m in ("ddp", "fsdp")]
    assert kl[0] > 0 and math.isclose(*kl, rel_tol=1e-4), kl


def test_an_fsdp_checkpoint_loads_as_a_plain_model(two_ranks, monkeypatch):
    """The checkpoint of a sharded run is a Hugging Face model dir: from_pretrained finds every weight (the tied LM
    head tied back), its logits equal the DDP run's checkpoint's, and eval_gsm8k.py evaluates it as any model."""
    from transformers import AutoModelForCausalLM
    out, report = two_ranks
    ckpt = {m: out / f"grpo-{m}" / "ckpt-000002" for m in ("ddp", "fsdp")}
    model, info = AutoModelForCausalLM.from_pretrained(ckpt["fsdp"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ddp = loading.model(str(ckpt["ddp"]), torch.device("cpu"))
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - ddp(ids).logits).abs().max().item()
    assert diff < 1e-5, diff
    state = torch.load(ckpt["fsdp"] / "trainer_state.pt", weights_only=True)  # AdamW's state: plain tensors, whole
    sizes = sorted(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    assert sizes == sorted(p.numel() for p in model.parameters()), "the optimizer state is not whole"
    ev = out / "eval"
    run_main(eval_gsm8k, ["--tiny", f"--model={ckpt['fsdp']}", "--limit=4", f"--out_dir={ev}"], monkeypatch)
    summary = json.load(open(ev / "summary.json"))  # the run's own last evaluation: the same 4 problems, greedy
    assert summary["problems"] == 4 and summary["metrics"]["strict"] == report["grpo"]["fsdp"]["2"]["eval/strict"]


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_every_trainer_s_ddp_gradient_equals_one_process_s(ddp_updates, name):
    """The trainer's own step as two DDP ranks (rank 1 holding few tokens and only all-equal groups) gives the
    optimizer the gradient one process gives it on the whole batch, to fp32 rounding (1e-5 of the largest entry),
    at every optimizer step (PPO: the critic's too): the loss goes through the wrapped model, and the
    normalisers and world-size factors make the ranks' average the whole batch's loss."""
    r = ddp_updates[name]
    assert r["steps"] == (2 if name == "ppo" else 1) and r["size"] > 0, r
    assert r["ddp_vs_single"] < 1e-5, r


def test_dapo_fills_its_batch_from_both_ranks_kept_groups(ddp_updates):
    """In that step DAPO's rank 1 kept none of its own groups in the first round; a second round filled the batch,
    and both ranks trained on their share of the kept groups (the gradients above equal one process's)."""
    m = ddp_updates["dapo"]["metrics"]
    assert m["sampling_rounds"] == 2 and m["filtered_groups"] > 0, m


@pytest.mark.slow
def test_a_finished_two_rank_run_exits_0_every_time_under_load():
    """A correct run once died at teardown (SIGABRT, "terminate called without an active exception"): interpreter
    finalization ran while a gloo worker thread still held the last collective's work. A process that joined a
    process group leaves through os._exit after flushing: finalization (the atexit marker) never runs. A process of
    its own: the race needs fresh interpreters, three times, beside a busy core."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # load: the race's window widens
    try:
        for _ in range(3):
            p = run(torchrun(2, "tests/launch/teardown.py"), timeout=600)
            assert "terminate called" not in p.stderr and p.stdout.count(": finished") == 2, p.stderr[-3000:]
            assert "interpreter finalization ran" not in p.stdout, p.stdout
    finally:
        burner.kill()


def _rank_pids(launcher):
    """{RANK: pid} of the worker processes a torchrun launcher started (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def _running(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _sigterm_pending(pid):
    """True once a SIGTERM waits for the (stopped) process `pid`, or it is gone."""
    try:
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    except OSError:
        return True
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
def test_a_stalled_rank_stops_the_job_with_one_line(tiny_dir, tmp_path):
    """Rank 1 is frozen (SIGSTOP) after step 2; rank 0 must give up after --dist_timeout seconds, not gloo's 30
    minutes, with one line naming its rank, the last step done and our line that waited. Processes of their own:
    a rank is frozen from outside."""
    timeout = 10
    flags = ["--tiny", "--num_steps=40", "--batch_prompts=4", "--group_size=4", "--eval_every=0", "--eval_problems=8",
             "--save_every=100", f"--dist_timeout={timeout}", f"--run_dir={tmp_path}"]
    p = subprocess.Popen(torchrun(2, "grpo.py", *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log, deadline = tmp_path / "metrics.jsonl", time.time() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # the step-0 eval row, steps 1 and 2
        assert p.poll() is None and time.time() < deadline, f"the run ended or stalled early: {p.communicate()}"
        time.sleep(0.2)
    ranks = _rank_pids(p.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.time()
    try:
        while _running(ranks[0]) and time.time() - t0 < 600:
            time.sleep(0.2)
        waited = time.time() - t0
        while not _sigterm_pending(ranks[1]) and time.time() - t0 < 600:  # torchrun stops the frozen rank: let
            time.sleep(0.2)  # its SIGTERM arrive first, or rank 1, woken, reports the lost peer in a line of its own
    finally:
        os.kill(ranks[1], signal.SIGCONT)  # so torchrun's SIGTERM reaches it
    out, err = p.communicate(timeout=600)
    assert p.returncode != 0
    assert timeout <= waited < timeout + 120, f"rank 0 stopped {waited:.0f} s after rank 1 froze"
    lines = [l for l in err.splitlines() if "grpo.py: error:" in l]
    assert len(lines) == 1 and "[rank0]: Traceback" not in err, err[-4000:]
    step = int(lines[0].split("after step ")[1].split(",")[0])
    assert 2 <= step < 40 and f"waited {timeout} s for the other ranks" in lines[0] and "--dist_timeout" in lines[0]
    assert "rank 0:" in lines[0] and " at grpo.py:" in lines[0], lines[0]


@pytest.mark.parametrize("message, says", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 10000ms for recv operation", "waited"),
    ("Application timeout caused pair closure", "waited"),  # gloo, when the wait ends inside DDP's backward
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4711", "lost"),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Connection reset by peer", "lost"),
    ("mat1 and mat2 shapes cannot be multiplied", None)])
def test_every_way_gloo_reports_a_lost_collective_is_one_line(message, says, monkeypatch):
    """What collective_failure makes of each message gloo gives (a rank stalled: a timeout; a rank died: a lost
    connection); any other error is not its business (None: the traceback stays)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    monkeypatch.setitem(distributed._state, "timeout", 10.0)
    try:
        line = distributed.collective_failure(RuntimeError(message))
    finally:
        torch.distributed.destroy_process_group()
    if says is None:
        assert line is None
    else:
        assert line.startswith("rank 0: after step ") and says in line, line
        assert ("waited 10 s" in line and "--dist_timeout" in line) == (says == "waited"), line


def launch_two_ranks(args, out_dir, timeout):
    """Ranks 0 and 1 of `python dapo.py args` as two plain processes (torchrun would stop one rank as soon
    as the other fails, which would hide whether both fail by themselves): [(exit status, stdout + stderr)]."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        logs.append(open(out_dir / f"rank{rank}.log", "w+"))
        procs.append(subprocess.Popen([sys.executable, "dapo.py", *args], cwd=ROOT, env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))  # raises TimeoutExpired on a hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, f in zip(procs, logs):
        f.seek(0)
        results.append((p.returncode, f.read()))
        f.close()
    return results


def test_dapo_with_every_group_filtered_stops_both_ranks_with_one_error(tiny_dir, tmp_path):
    """max_new_tokens = 1: every completion is one character, never a '#### N' line, so every group is all wrong and
    filtered, on every rank and in every round: both ranks stop with the same error. Plain processes: torchrun would
    stop one rank as soon as the other fails, hiding whether both fail by themselves."""
    results = launch_two_ranks(["--tiny", "--num_steps=1", "--batch_prompts=4", "--group_size=2",
                                "--max_new_tokens=1", "--max_sampling_rounds=2", "--eval_problems=2",
                                f"--run_dir={tmp_path / 'run'}"], tmp_path, timeout=300)
    msg = "dynamic sampling: 0 of batch_prompts=4 groups kept after 8 prompts in max_sampling_rounds=2"
    errors = []
    for rank, (status, log) in enumerate(results):  # a user can fix it: one line, exit 2, no traceback
        assert status == 2 and "Traceback" not in log, f"rank {rank} exited {status}\n{log[-3000:]}"
        found = re.findall(r"^dapo.py: error: (dynamic sampling: .*)$", log, re.M)
        assert len(found) == 1 and msg in found[0], f"rank {rank}:\n{log[-3000:]}"
        errors.append(found[-1])
    assert errors[0] == errors[1]  # the same error on both ranks: they counted the same kept groups
    assert "--max_sampling_rounds" in errors[0]


@pytest.mark.parametrize("flags,words", [
    (["--group_size=1"], "--group_size=1 is out of range"),                                    # a flag
    (["--data_path=/nonexistent/gsm8k"], "GSM8K train file /nonexistent/gsm8k does not exist"),  # the data
    (["--model=/nonexistent/model"], "model or checkpoint directory /nonexistent/model does not exist"),  # the model
    (["--run_dir=RUN_DIR"], "already holds another run")], ids=["flag", "data", "model", "run-dir"])  # the run dir
def test_a_mistake_under_torchrun_is_one_line_from_rank_0_then_torchrun_s_report(flags, words, tmp_path):
    """What a user sees when a launch has a mistake: the script's line once (every rank meets the same mistake in the
    same flags and files, so the machine's rank 0 alone says it), first; then torchrun's own report of a child that
    exited 2, which it always prints."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt-000001").mkdir()  # another run's checkpoint
    (tmp_path / "run" / "run_id").write_text("another\n")
    flags = [f.replace("RUN_DIR", str(tmp_path / "run")) for f in flags]
    p = subprocess.run([*torchrun(2, "grpo.py"), "--tiny", *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = p.stderr.strip().splitlines()
    ours = [l for l in lines if l.startswith("grpo.py: error: ")]
    assert p.returncode != 0 and len(ours) == 1 and words in ours[0], p.stderr[-3000:]
    before = lines[:lines.index(ours[0])]  # at most torchrun's OMP_NUM_THREADS banner (when the variable is unset)
    assert not any("Traceback" in l or "failed" in l or "error" in l.lower() for l in before), p.stderr[-3000:]
    assert "exitcode  : 2" in p.stderr, p.stderr[-3000:]  # ours first; torchrun's summary
