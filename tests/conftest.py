import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k")

import common  # noqa: E402


def single_process():
    """A Dist for one CPU process."""
    return common.Dist(False, 0, 0, 1, torch.device("cpu"), True)


@pytest.fixture(scope="session")
def tiny_dir():
    """The warm-started tiny model (built once per cache, then loaded from disk)."""
    return common.ensure_tiny_model(single_process(), log=lambda *a: None)


def run(cmd, timeout=900, env=None):
    """Run a command from the repo root; fail the test with its output if it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def torchrun(nproc, *args):
    """The argv of a CPU torchrun launch with `nproc` gloo processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0"
            if False else f"--master-port={29500 + os.getpid() % 1000}", *args]
