"""Distributed training is really distributed: 2-process gloo runs on CPU."""
import json
import os

from conftest import run, torchrun


def test_ddp_update_equals_single_process_update(tiny_dir):
    p = run(torchrun(2, "tests/ddp_grpo_check.py"))
    assert p.stdout.count("DDP update == single-process update") == 2


def test_grpo_trains_under_torchrun(tiny_dir, tmp_path):
    # grpo.py ends with common.check_replicas: it raises unless both ranks hold identical
    # weights and took the same number of optimizer steps.
    run(torchrun(2, "grpo.py", "--tiny", "--num_steps=2", "--batch_prompts=4", "--group_size=4",
                 "--eval_problems=8", f"--run_dir={tmp_path}"))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert os.path.isfile(tmp_path / "ckpt-000002" / "rng_rank1.pt")
