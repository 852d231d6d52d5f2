"""Nothing runs, nothing is lost: a crafted checkpoint never executes code, and a diverged update stops the run
before it is logged or saved (the safety issue's items 1 and 2)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run
from test_user_errors import FAST, fails


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint would do to the person who resumes it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    run(["python", "grpo.py", *FAST, "--num_steps=1", f"--run_dir={run_dir}"])
    state_path = run_dir / "ckpt-000001" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)  # what the run wrote is plain data
    marker = tmp_path / "payload-ran"
    state["extra"] = {"x": Payload(marker)}  # before: loaded with weights_only=False, the command ran, exit 0
    torch.save(state, state_path)
    line = fails([*FAST, "--num_steps=2", f"--run_dir={run_dir}", f"--resume={run_dir}"],
                 "trainer_state.pt: refused", "objects that loading would run", "posix.system")
    assert not marker.exists(), f"the payload ran: {line}"
    rng_path = run_dir / "ckpt-000001" / "rng_rank0.pt"  # the RNG file too: it is loaded the same way
    state["extra"] = {}
    torch.save(state, state_path)
    torch.save({"python": Payload(marker)}, rng_path)
    fails([*FAST, "--num_steps=2", f"--run_dir={run_dir}", f"--resume={run_dir}"], "rng_rank0.pt: refused")
    assert not marker.exists()


def test_a_diverged_update_stops_the_run_and_is_never_saved(tmp_path, tiny_dir):
    run_dir = tmp_path / "run"
    # lr 1e3: the first update blows the weights up, the next step's loss and gradient norm are not finite
    p = subprocess.run([sys.executable, "grpo.py", *FAST, "--lr=1e3", "--warmup_steps=1", "--num_steps=4",
                        "--save_every=1", f"--run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    line = p.stderr.strip().splitlines()[-1]  # the lines before it are the progress bar's
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert line.startswith("grpo.py: error: step ") and "not finite" in line and "--lr=1000.0" in line, line
    step = int(line.split("step ")[1].split(":")[0])
    assert 1 <= step <= 4
    logged = [json.loads(x)["step"] for x in open(run_dir / "metrics.jsonl")]
    assert max(logged) == step - 1, (logged, line)  # the diverged step is not logged
    ckpts = sorted(x.name for x in run_dir.iterdir() if x.name.startswith("ckpt-"))
    assert f"ckpt-{step:06d}" not in ckpts and all(int(c[5:]) < step for c in ckpts)
    if ckpts:  # `latest` names the last good checkpoint, whose weights are all finite
        latest = (run_dir / "latest").read_text().strip()
        assert latest == ckpts[-1]
        assert all(torch.isfinite(t).all() for t in load_file(run_dir / latest / "model.safetensors").values())


def test_non_finite_weights_are_never_saved(tmp_path, tiny_dir):
    import common
    import grpo
    from conftest import single_process
    lm = common.load_model(tiny_dir, torch.device("cpu"))
    (tmp_path / "run_id").write_text("r")
    with torch.no_grad():
        next(lm.parameters())[0, 0] = float("inf")
    cfg = grpo.Config(run_dir=str(tmp_path), lr=0.5)
    with pytest.raises(common.UserError, match=r"step 3: the weights are not finite.*--lr=0.5"):
        common.save_checkpoint(str(tmp_path), 3, lm, common.load_tokenizer(tiny_dir),
                               torch.optim.AdamW(lm.parameters()), cfg, single_process())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run_id"]  # no ckpt dir, no `latest`
