"""Distributed training is really distributed: 2-process gloo runs on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run, torchrun


def test_ddp_update_equals_single_process_update(tiny_dir):
    p = run(torchrun(2, "tests/ddp_grpo_check.py"))
    assert p.stdout.count("DDP update == single-process update") == 2


def test_grpo_trains_under_torchrun(tiny_dir, tmp_path):
    # grpo.py ends with distributed.check_replicas: it raises unless both ranks hold identical
    # weights and took the same number of optimizer steps.
    run(torchrun(2, "grpo.py", "--tiny", "--num_steps=2", "--batch_prompts=4", "--group_size=4",
                 "--eval_problems=8", f"--run_dir={tmp_path}"))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert os.path.isfile(tmp_path / "ckpt-000002" / "rng_rank1.pt")


def test_a_finished_two_rank_run_exits_0_every_time_under_load():
    # a correct run once died at teardown (SIGABRT, "terminate called without an active exception"): interpreter
    # finalization ran while a gloo worker thread still held the last collective's work. Now a process that joined
    # a process group leaves through os._exit after flushing: finalization (the atexit marker) never runs.
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # load: the race's window widens
    try:
        for _ in range(3):
            p = run(torchrun(2, "tests/ddp_teardown_check.py"), timeout=600)
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


def test_a_stalled_rank_stops_the_job_with_one_line(tiny_dir, tmp_path):
    # rank 1 is frozen (SIGSTOP) after step 2; rank 0 must give up after --dist_timeout seconds, not gloo's 30
    # minutes, with one line naming its rank, the last step done and our line that waited
    timeout = 10
    p = subprocess.Popen(torchrun(2, "grpo.py", "--tiny", "--num_steps=40", "--batch_prompts=4", "--group_size=4",
                                  "--eval_every=0", "--eval_problems=8", "--save_every=100", f"--dist_timeout={timeout}",
                                  f"--run_dir={tmp_path}"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
