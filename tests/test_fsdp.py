"""--fsdp (fsdp.py): every trainer sharded with FSDP2 over 2 gloo processes on the CPU.

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

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_error, run, torchrun
from grpo_family import loading
from tools import trainers
import dpo
import grpo

TRAINERS = [n for n in trainers.TRAINERS if n != "dpo"]  # every trainer but dpo.py, which refuses --fsdp (below)
SAMPLED = ("reward", "accuracy", "response_length", "truncated", "zero_std_groups", "eval/strict", "eval/lenient")
FAST = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0"]


def metrics(run_dir):
    return {json.loads(l)["step"]: json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))}


def assert_same_run(name, a, b):
    """Two runs' logged metrics: sampled quantities equal, the rest equal to fp32 rounding."""
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


@pytest.fixture(scope="module")
def all_trainers(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainers")
    run(torchrun(2, "tests/fsdp_trainers_check.py", str(out), ",".join(TRAINERS)), timeout=2400)
    return out, json.load(open(out / "report.json"))


def test_fsdp_update_equals_single_process_update(tiny_dir, tmp_path):
    p = run(torchrun(2, "tests/fsdp_update_check.py", str(tmp_path / "report.json")))
    assert p.stdout.count("--fsdp update == single-process update") == 2
    r = json.load(open(tmp_path / "report.json"))
    assert r["update_size"] > 1e-3 and r["update_diff"] < 1e-5, r
    assert r["decode_copy_diff"] == 0.0 and r["resume_diff"] == 0.0, r
    for single, sharded in r["grad_norms"]:  # above the clip (0.5): clipping acted on both
        assert single > 0.5 and math.isclose(single, sharded, rel_tol=1e-5), r["grad_norms"]


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_under_fsdp_equals_its_ddp_run(all_trainers, name):
    """Two steps of the tiny default with --fsdp and with DDP from the same start: the same completions, rewards
    and held-out answers, the same losses to rounding, the same weights (PPO: and critic) to 1e-6. Each run ended
    with distributed.check_replicas, which compares the whole weights and the optimizer steps across ranks."""
    _, report = all_trainers
    r = report[name]
    assert r["weight_diff"] < 1e-6, (name, r["weight_diff"])
    assert_same_run(name, r["ddp"], r["fsdp"])
    assert r["fsdp"]["2"]["grad_norm"] > 0 and r["fsdp"]["2"]["loss"] is not None


def test_the_reference_model_is_sharded_and_used(all_trainers):
    """grpo's default β = 0.04: the KL to the (sharded) reference is logged, and equals DDP's (unsharded) one."""
    _, report = all_trainers
    kl = [report["grpo"][m]["2"]["kl"] for m in ("ddp", "fsdp")]
    assert kl[0] > 0 and math.isclose(*kl, rel_tol=1e-4), kl


def test_an_fsdp_checkpoint_loads_as_a_plain_model(all_trainers, tiny_dir):
    """The checkpoint of a sharded run is a Hugging Face model dir: from_pretrained finds every weight (the tied LM
    head tied back), its logits equal the DDP run's checkpoint's, and eval_gsm8k.py evaluates it as any model."""
    from transformers import AutoModelForCausalLM
    out, report = all_trainers
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
    run([sys.executable, "eval_gsm8k.py", "--tiny", f"--model={ckpt['fsdp']}", "--limit=8", f"--out_dir={ev}"])
    summary = json.load(open(ev / "summary.json"))  # the run's own last evaluation: the same 8 problems, greedy
    assert summary["problems"] == 8 and summary["metrics"]["strict"] == report["grpo"]["fsdp"]["2"]["eval/strict"]


def test_an_fsdp_run_resumes_exactly(tiny_dir, tmp_path):
    """Four steps straight vs two, then two more from the checkpoint (sharded weights and AdamW state restored from
    the whole copies the checkpoint holds): steps 3 and 4 log the same numbers and end at the same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["grpo.py", *FAST, "--fsdp", "--save_every=2"]
    run(torchrun(2, *args, "--num_steps=4", f"--run_dir={a}"))
    run(torchrun(2, *args, "--num_steps=2", f"--run_dir={b}"))
    run(torchrun(2, *args, "--num_steps=4", f"--run_dir={b}", f"--resume={b}"))
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
    """The fast rollout decodes from the gathered copy; activations are recomputed inside the sharded layers."""
    flags = ["--fast_rollout=true", "--gradient_checkpointing=true"]
    run(torchrun(2, "tests/fsdp_trainers_check.py", str(tmp_path), "grpo", *flags), timeout=1200)
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


def test_the_predicted_memory_table_in_the_docs_is_the_scripts_output():
    """docs/fsdp.md's table is what tools/fsdp_memory.py prints now (so a change to either shows), from exact
    parameter counts (Qwen2.5-1.5B: 1,543,714,304 parameters, 1.54B as its model card says)."""
    p = run([sys.executable, "-m", "tools.fsdp_memory"])
    table = [l for l in p.stdout.splitlines() if l.startswith("|")]
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "fsdp.md")).read()
    assert len(table) == 8 and all(l in doc for l in table), p.stdout
    from tools import fsdp_memory
    assert fsdp_memory.sizes("Qwen2.5-1.5B")[1] == 1_543_714_304
    for world in (2, 8):  # sharding divides what is held by the number of ranks; DDP's does not move
        ddp, sharded = fsdp_memory.predict("Qwen2.5-7B", world, False), fsdp_memory.predict("Qwen2.5-7B", world, True)
        assert math.isclose(sum(sharded[0].values()) * world, sum(ddp[0].values())) and sharded[3] < ddp[3]
