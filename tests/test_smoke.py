"""grpo.py end to end on the tiny default, and an exact resume from its checkpoint."""
import json
import platform

import torch
from safetensors.torch import load_file

from conftest import run

FAST = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0"]


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}


def test_grpo_tiny_runs_and_resumes_exactly(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    p = run(["python", "grpo.py", *FAST, "--num_steps=4", "--save_every=2", f"--run_dir={a}"])
    assert "held-out greedy accuracy before RL" in p.stderr + p.stdout
    assert "held-out greedy accuracy after RL" in p.stderr + p.stdout
    import transformers  # printed once at start and kept in config.json and each checkpoint, for problem reports
    want = {"torch": torch.__version__, "transformers": transformers.__version__}
    assert (p.stdout + p.stderr).count("versions: ") == 1 and json.dumps(want)[1:-1] in p.stdout
    assert json.load(open(a / "config.json"))["versions"] == {"python": platform.python_version(), **want}
    assert json.load(open(a / "ckpt-000004" / "run_config.json"))["versions"]["torch"] == torch.__version__
    run(["python", "grpo.py", *FAST, "--num_steps=2", "--save_every=2", f"--run_dir={b}"])
    run(["python", "grpo.py", *FAST, "--num_steps=4", "--save_every=2", f"--run_dir={b}", f"--resume={b}"])
    ma, mb = metrics(a), metrics(b)
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "clip_frac", "response_length", "grad_norm", "mismatch", "mismatch_kl"):
            assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
    # every run logs the sampler/trainer mismatch (docs/rollout_correction.md): fp32 on the CPU, rounding only
    assert all(0 <= ma[s]["mismatch"] < 1e-4 and abs(ma[s]["mismatch_kl"]) < 1e-6 for s in (1, 2, 3, 4))
    assert "rc_weight" not in ma[4]  # --rollout_correction=none: no weights
    wa = load_file(a / "ckpt-000004" / "model.safetensors")
    wb = load_file(b / "ckpt-000004" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(a / "ckpt-000002" / "model.safetensors")
    assert any(not torch.equal(wa[k], w0[k]) for k in wa), "training did not change the weights"
    assert sorted(x.name for x in a.iterdir() if x.name.startswith("ckpt")) == ["ckpt-000002", "ckpt-000004"]


def test_resume_from_missing_checkpoint_is_a_clear_error(tmp_path):
    from test_user_errors import fails  # exit 2 and one line (before: any non-zero exit passed, a traceback too)
    fails([*FAST, "--num_steps=1", f"--run_dir={tmp_path}", f"--resume={tmp_path / 'none'}"], "no checkpoint at")
