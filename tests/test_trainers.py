"""What every trainer must do (tools/trainers.py's list), each checked the same way for all sixteen:
- its settings: every field documented, every default and --tiny value inside the range its comment declares, the
  run dir and progress label named after the file, --help listing every field;
- its command line: a bad flag, and each trainer's own bad settings, stop it with one line and exit 2;
- its loop, in this process: two steps of the tiny default sampling for real (what it logs, its checkpoint), and
  two steps on written-out completions (tests/helpers.py), where a gradient is certain on any build of the tiny
  model: the weights move, and what only moves with them (SAPO's gate, PPO's critic) does;
- its resume: a run stopped and resumed from its checkpoint continues exactly as the uninterrupted one.
The two-rank runs of every trainer (DDP, --fsdp, DDP equal to one process) are in test_ddp.py.
"""
import dataclasses
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from grpo_family import config, logs, rollout
from helpers import cli_error, constructed_sampler
from tools import trainers

FAST = ["--tiny", "--num_steps=2", "--batch_prompts=4", "--eval_problems=8"]
SMOKE = {"dppo": ["--divergence=kl"], "reinforcepp": ["--baseline=true"]}  # the option the two-rank run leaves out


def module(name):
    return trainers.load(name)


def train(name, argv, monkeypatch):
    """`python <name>.py argv` in this process; returns its metrics by step."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    module(name).main()
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--run_dir="))
    return {r["step"]: r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))}


# -----------------------------------------------------------------------------
# settings and the command line


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_every_setting_is_documented_and_its_defaults_lie_in_their_declared_ranges(name):
    cls, tiny = module(name).Config, module(name).TINY
    docs = config._field_docs(cls)
    assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == [], f"{name}: fields with no comment"
    for values in ({}, tiny):
        cfg = cls(**values)
        for field, doc in docs.items():
            shown, ok = config._valid_values(doc)
            assert ok is None or ok(getattr(cfg, field)), f"{name}: --{field}={getattr(cfg, field)!r} not in {shown}"
    assert set(tiny) <= {f.name for f in dataclasses.fields(cls)}, f"{name}: TINY sets a field Config lacks"
    assert config.run_name(cls) == name
    assert config.parse(cls, ["--tiny"], tiny=tiny).run_dir == f"runs/{name}-tiny"


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_help_lists_every_setting_with_its_default(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        module(name).main()
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: python {name}.py")
    for f in dataclasses.fields(module(name).Config):
        assert f"--{f.name}={f.default!r}" in out, (name, f.name)


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_a_bad_flag_is_one_line_and_exit_2(name, capsys, monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    line = cli_error(module(name), ["--tiny", "--lerning_rate=1", f"--run_dir={run_dir}"], capsys, monkeypatch)
    assert "unknown config key --lerning_rate" in line
    line = cli_error(module(name), ["--tiny", "--group_size=1", f"--run_dir={run_dir}"], capsys, monkeypatch)
    assert "--group_size=1 is out of range" in line
    assert not run_dir.exists()  # refused before anything is written


# each trainer's own settings a user can get wrong: (trainer, flags, words the one line names)
OWN_ERRORS = [
    ("dapo", ["--filter_metric=x"], ["--filter_metric=", "out of range"]),
    ("dapo", ["--beta=-0.1"], ["--beta=", "out of range"]),
    ("sapo", ["--tau_neg=0"], ["--tau_neg", "out of range"]),
    ("gfpo", ["--filter_metric=longest"], ["--filter_metric", "longest"]),
    ("gfpo", ["--keep=17"], ["keep", "17", "group_size=16"]),  # k > G = 16
    ("gtpo", ["--ent_rule=nope"], ["--ent_rule="]),
    ("gtpo", ["--ent_percentile=101"], ["--ent_percentile="]),
    ("drgrpo", ["--beta=-1"], ["--beta=", "out of range"]),
    ("cispo", ["--clip_eps_high=0"], ["--clip_eps_high=", "out of range"]),
    ("cispo", ["--clip_eps_low=-0.1"], ["--clip_eps_low=", "out of range"]),
    ("rloo", ["--beta=nan"], ["--beta=nan", "not a number"]),
    ("gmpo", ["--clip_eps=0"], ["--clip_eps=", "out of range"]),
    ("gdpo", ["--format_weight=-1"], ["--format_weight=", "out of range"]),
    ("dppo", ["--divergence=js"], ["--divergence=", "{tv, kl}"]),
    ("reinforcepp", ["--baseline=maybe"], ["--baseline"]),
]


@pytest.mark.parametrize("name,flags,words", OWN_ERRORS, ids=[f"{n}{f[0]}" for n, f, _ in OWN_ERRORS])
def test_a_trainer_s_own_bad_setting_is_one_line_and_exit_2(name, flags, words, capsys, monkeypatch, tmp_path):
    line = cli_error(module(name), ["--tiny", *flags, f"--run_dir={tmp_path / 'run'}"], capsys, monkeypatch)
    assert line.startswith(f"{name}.py: error: ") and all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# the loop, end to end on the tiny default


def check_logged(name, m, cfg):
    """What every trainer's log holds after two steps, on whatever the tiny model sampled."""
    assert sorted(m) == [0, 1, 2] and "eval/strict" in m[0] and "eval/strict" in m[2]
    for r in (m[1], m[2]):
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] >= 0
        assert 0 <= r["reward_correct" if name == "gdpo" else "accuracy"] <= 1 and r["response_length"] > 0
        assert 0 <= r.get("clip_frac", 0) <= 1 and 0 <= r["zero_std_groups"] <= 1
        assert name == "dpo" or 0 <= r["mismatch"] < 1e-4  # fp32 sampler vs forward: rounding (DPO: no π_old)
        if "kl" in r:
            assert r["kl"] == 0 if (cfg["beta"] == 0 and name != "dpo") else r["kl"] >= 0
    if name in ("rloo", "maxrl"):  # one update per rollout batch: on-policy, ρ = 1, the clip never acts
        assert m[1]["clip_frac"] == m[2]["clip_frac"] == 0
    if name == "dapo":
        assert all(1 <= m[s]["sampling_rounds"] <= cfg["max_sampling_rounds"] and m[s]["prompts_sampled"] >= 4
                   and -1.0 <= m[s]["overlong_penalty"] <= 0.0 for s in (1, 2))
    if name == "gspo":
        assert all(0 <= m[s]["clip_frac_seq"] <= 1 for s in (1, 2))
    if name == "sapo":
        assert "clip_frac" not in m[1] and all(0 <= m[s]["frac_outside_clip"] <= 1 for s in (1, 2))
    if name == "gfpo":  # the 8 shortest of 16: the retained completions are never longer on average
        assert all(m[s]["keep"] == 8 and 0 < m[s]["response_length_retained"] <= m[s]["response_length"]
                   and 0 <= m[s]["filter_zeroed_groups"] <= m[s]["zero_std_retained_groups"] <= 1 for s in (1, 2))
    if name == "gtpo":  # one process: ⟨H⟩_ini is the first batch's mean ⟨H⟩_i, kept after
        assert m[1]["ent_initial"] == m[2]["ent_initial"] == m[1]["entropy_seq"] > 0
        assert all(0 <= m[s]["filtered_frac"] <= 1 and 0 <= m[s]["conflict_frac"] <= 1 for s in (1, 2))
    if name == "ppo":  # the critic's head starts at zero: V_old = 0 and nothing explained at step 1
        assert m[1]["value"] == 0 and m[1]["explained_variance"] == 0
    if name == "dpo":
        for r in (m[1], m[2]):
            assert r["pairs_per_prompt"] == pytest.approx(1 - r["zero_std_groups"], abs=1e-6)
            assert "ratio" not in r and (r["pairs_per_prompt"] == 0 or r["pair_reward_margin"] > 0)
    if name == "gdpo":
        assert all(m[s]["reward"] == pytest.approx(m[s]["reward_correct"] + m[s]["reward_format"], abs=1e-6)
                   for s in (1, 2))
    if name == "reinforcepp":
        assert all(math.isfinite(m[s]["reward_kl"]) for s in (1, 2))


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_two_steps_of_the_tiny_default(name, tiny_dir, tmp_path, capsys, monkeypatch):
    """The whole loop as `python <name>.py --tiny` runs it (sampling, rewards, update, evaluation, checkpoint),
    asserting only what holds whatever the tiny model samples."""
    run_dir = tmp_path / "run"
    m = train(name, [*FAST, *SMOKE.get(name, []), f"--run_dir={run_dir}"], monkeypatch)
    out = capsys.readouterr()
    assert "held-out greedy accuracy before RL" in out.out + out.err and "after RL" in out.out + out.err
    cfg = json.load(open(run_dir / "config.json"))
    check_logged(name, m, cfg)
    assert (run_dir / "latest").read_text().strip() == "ckpt-000002"
    state = torch.load(run_dir / "ckpt-000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]
    assert state["config"] == {k: v for k, v in cfg.items() if k != "versions"}  # the settings it ran with
    if name == "ppo":  # the critic and its AdamW state travel in the checkpoint, whole
        assert state["extra"]["critic"]["head.weight"].shape[0] == 1 and state["extra"]["critic_optimizer"]["state"]


class Recorder:
    """logs.Logger's interface, keeping every step's metrics."""
    rows = {}

    def __init__(self, *args, **kwargs):
        Recorder.rows = {}

    def log(self, step, metrics):
        Recorder.rows[step] = dict(metrics)


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_written_completions_move_every_trainer_s_policy(name, tiny_dir, tmp_path, monkeypatch):
    """Two steps on written-out completions, with a reward spread in every group whatever the model: a gradient in
    each step, the weights move, and SAPO's gate and PPO's critic act (their second look is off-policy, or trained)."""
    monkeypatch.setattr(rollout, "sample", constructed_sampler())
    monkeypatch.setattr(logs, "Logger", Recorder)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *FAST, "--save_every=1", f"--run_dir={run_dir}"])
    module(name).main()
    m = Recorder.rows
    assert all(m[s]["grad_norm"] > 0 and math.isfinite(m[s]["loss"]) for s in (1, 2)), m
    w1, w2 = (load_file(run_dir / f"ckpt-00000{s}" / "model.safetensors") for s in (1, 2))
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert any(not torch.equal(w1[k], start[k]) for k in w1) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    if name == "sapo":  # the second mini-batch of a step is off-policy: the soft gate weighs its tokens below 1
        assert min(m[1]["gate_weight_pos"], m[1]["gate_weight_neg"]) < 1
    if name == "ppo":  # the critic learned in step 1: its values at step 2 are no longer 0
        assert m[2]["value"] != 0 and m[1]["value_loss"] > 0


# -----------------------------------------------------------------------------
# resume: stopped after 2 steps and resumed to 4, the same as 4 steps straight


RESUMED = {"grpo": ["loss", "reward", "kl", "clip_frac", "response_length", "grad_norm", "mismatch", "mismatch_kl"],
           "ppo": ["loss", "value_loss", "explained_variance", "value", "return", "reward", "grad_norm",
                   "critic_grad_norm"],  # value_loss and explained_variance see the critic: a fresh one would differ
           "gtpo": ["loss", "reward", "entropy_seq", "conflict_frac", "filtered_frac", "ent_threshold", "grad_norm",
                    "ent_initial"]}
RESUME_FLAGS = {"gtpo": ["--ent_rule=percentile", "--ent_percentile=75"]}  # its history must survive the resume


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_a_resumed_run_continues_exactly(name, tiny_dir, tmp_path, monkeypatch, capsys):
    """grpo.py's state (weights, AdamW, every RNG), PPO's critic with its AdamW, and GTPO's measured ⟨H⟩_ini and
    ⟨H⟩_i history: steps 3 and 4 after a resume log the same numbers and end at the same weights as a straight run."""
    flags = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0", "--save_every=2",
             *RESUME_FLAGS.get(name, [])]
    a, b = tmp_path / "a", tmp_path / "b"
    ma = train(name, [*flags, "--num_steps=4", f"--run_dir={a}"], monkeypatch)
    train(name, [*flags, "--num_steps=2", f"--run_dir={b}"], monkeypatch)
    capsys.readouterr()
    mb = train(name, [*flags, "--num_steps=4", f"--run_dir={b}", f"--resume={b}"], monkeypatch)
    if name == "gtpo":
        assert "initial mean entropy" not in "".join(capsys.readouterr())  # restored, not measured again
    for step in (3, 4):
        for key in RESUMED[name]:
            assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
    wa, wb = (load_file(x / "ckpt-000004" / "model.safetensors") for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(x / "ckpt-000004" / "trainer_state.pt", weights_only=True) for x in (a, b))
    for i in sa["optimizer"]["state"]:
        assert all(torch.equal(sa["optimizer"]["state"][i][k], sb["optimizer"]["state"][i][k])
                   for k in sa["optimizer"]["state"][i])
    if name == "ppo":
        assert all(torch.equal(sa["extra"]["critic"][k], sb["extra"]["critic"][k]) for k in sa["extra"]["critic"])
    if name == "gtpo":  # the history grows by every rank's ⟨H⟩_i of each step: 4 prompts x 4 per step
        assert sa["extra"] == sb["extra"] and len(sb["extra"]["ent_history"]) == 4 * 16
