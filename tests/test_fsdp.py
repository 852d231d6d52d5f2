"""--fsdp (grpo_family/fsdp.py) over 2 gloo processes on the CPU; every trainer's --fsdp run against its DDP run is
in test_ddp.py (tests/launch/two_ranks.py).

Tolerances: a sharded run sums the same fp32 numbers in another order than one process or DDP (gradients are
reduce-scattered per micro-batch, the clip norm is reduced over shards), so weights agree to rounding, not bit
for bit; the sampled tokens, rewards and held-out answers agree exactly. AdamW's first steps move every weight by
about lr whatever the gradient's size, so a rounding difference in a near-zero gradient entry can show at up to
lr x 1e-2: the update check allows 1e-5 at lr = 1e-3 (measured 2.5e-6), the two-step runs 1e-6 (measured <= 1.2e-7).
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

from helpers import assert_same_run, cli_error, run, torchrun
from tools import fsdp_memory
import dpo
import grpo

FAST = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0"]


def metrics(run_dir):
    return {json.loads(l)["step"]: json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))}


def test_fsdp_update_equals_single_process_update(tiny_dir, tmp_path):
    """tests/launch/fsdp_update.py (processes of their own: two ranks to shard over)."""
    p = run(torchrun(2, "tests/launch/fsdp_update.py", str(tmp_path / "report.json")))
    assert p.stdout.count("--fsdp update == single-process update") == 2
    r = json.load(open(tmp_path / "report.json"))
    assert r["update_size"] > 1e-3 and r["update_diff"] < 1e-5, r
    assert r["decode_copy_diff"] == 0.0 and r["resume_diff"] == 0.0, r
    for single, sharded in r["grad_norms"]:  # above the clip (0.5): clipping acted on both
        assert single > 0.5 and math.isclose(single, sharded, rel_tol=1e-5), r["grad_norms"]


def test_an_fsdp_run_resumes_exactly(tiny_dir, tmp_path):
    """Four steps straight vs two, then two more from the checkpoint (sharded weights and AdamW state restored from
    the whole copies the checkpoint holds): steps 3 and 4 log the same numbers and end at the same weights.
    Processes of their own: two ranks to shard over, three runs in one launch (tests/launch/runs.py)."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = " ".join(["grpo.py", *FAST, "--fsdp", "--save_every=2"])  # three runs, one launch: tests/launch/runs.py
    run(torchrun(2, "tests/launch/runs.py", f"{args} --num_steps=4 --run_dir={a}", f"{args} --num_steps=2 --run_dir={b}",
                 f"{args} --num_steps=4 --run_dir={b} --resume={b}"))
    ma, mb = metrics(a), metrics(b)
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "clip_frac", "grad_norm", "eval/strict"):
            if key in ma[step]:
                assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
    wa, wb = (load_file(x / "ckpt-000004" / "model.safetensors") for x in (a, b))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(x / "ckpt-000004" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
              for x in (a, b))
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_fsdp_with_the_fast_decoder_and_gradient_checkpointing(tiny_dir, tmp_path):
    """The fast rollout decodes from the gathered copy; activations are recomputed inside the sharded layers.
    Processes of their own: two ranks to shard over (tests/launch/two_ranks.py, GRPO only, sampling for real)."""
    flags = ["--fast_rollout=true", "--gradient_checkpointing=true"]
    run(torchrun(2, "tests/launch/two_ranks.py", str(tmp_path), "grpo", "sampled", *flags), timeout=1200)
    r = json.load(open(tmp_path / "report.json"))["grpo"]
    assert r["weight_diff"] < 1e-6, r["weight_diff"]
    assert_same_run("grpo", r["ddp"], r["fsdp"])
    saved = json.load(open(tmp_path / "grpo-fsdp" / "config.json"))
    assert saved["fsdp"] and saved["fast_rollout"] and saved["gradient_checkpointing"]


def test_fsdp_refuses_what_it_cannot_shard_in_one_line(capsys, monkeypatch):
    line = cli_error(grpo, ["--tiny", "--fsdp"], capsys, monkeypatch)  # one process: nothing to shard over
    assert "--fsdp" in line and "torchrun --nproc_per_node" in line
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # as torchrun sets it; parse_config refuses before any process group starts
    line = cli_error(grpo, ["--tiny", "--fsdp", "--lora_rank=8"], capsys, monkeypatch)
    assert "drop --lora_rank" in line
    line = cli_error(dpo, ["--tiny", "--fsdp"], capsys, monkeypatch)
    assert "dpo.py" in line and "unequal numbers of pairs" in line


def test_the_predicted_memory_table_in_the_docs_is_the_scripts_output(capsys, monkeypatch):
    """docs/fsdp.md's table is what tools/fsdp_memory.py prints now (so a change to either shows), from exact
    parameter counts (Qwen2.5-1.5B: 1,543,714,304 parameters, 1.54B as its model card says)."""
    monkeypatch.setattr(sys, "argv", ["fsdp_memory.py"])
    fsdp_memory.main()
    table = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "fsdp.md")).read()
    assert len(table) == 8 and all(l in doc for l in table), table
    assert fsdp_memory.sizes("Qwen2.5-1.5B")[1] == 1_543_714_304
    for world in (2, 8):  # sharding divides what is held by the number of ranks; DDP's does not move
        ddp, sharded = fsdp_memory.predict("Qwen2.5-7B", world, False), fsdp_memory.predict("Qwen2.5-7B", world, True)
        assert math.isclose(sum(sharded[0].values()) * world, sum(ddp[0].values())) and sharded[3] < ddp[3]
