"""docs/course.md and docs/teaching.md stay true: every `file` lines A-B (`name`) reference is that function, every
command parses, the exercise table is what tools/exercise.py blanks, the ablation table is what tools/ablations.py
draws from the committed log; and each ablation changes only what it names."""
import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from helpers import F64, ROOT, cli_error, padded, toy, value_and_dj
from grpo_family import config
from tools import ablations, exercise, trainers
import drgrpo
import grpo

DOCS = [os.path.join(ROOT, "docs", name) for name in ("course.md", "teaching.md")]
LOG = os.path.join(ROOT, "docs", "course", "ablations.jsonl")


def text(path):
    return open(path, encoding="utf-8").read()


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_line_reference_is_the_function_it_names(path):
    refs = re.findall(r"`([\w/]+\.py)` lines (\d+)-(\d+) \(`(\w+)`\)", text(path))
    assert refs or path.endswith("teaching.md")
    for file, start, end, name in refs:
        tree = ast.parse(text(os.path.join(ROOT, file)))
        found = [(n.lineno, n.end_lineno) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
        assert found == [(int(start), int(end))], (file, name, found, "move the reference in " + path)


def commands(path):
    """Every `python ...` command quoted in a doc, as argv (environment assignments dropped)."""
    out = []
    for cmd in re.findall(r"`((?:[A-Z_]+=\S+ )*python [^`]+)`", text(path)) + \
            re.findall(r"^((?:[A-Z_]+=\S+ )*python [^#\n]+)", text(path), re.M):
        argv = [a for a in shlex.split(cmd) if not re.match(r"[A-Z_]+=", a)]
        out.append(argv[1:])
    return out


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_command_names_a_script_and_flags_that_exist(path):
    checked = 0
    for argv in commands(path):
        if argv[0] == "-c" or argv[:2] == ["-m", "pytest"] or argv[0].startswith("exercises/"):
            continue
        module = __import__(argv[1], fromlist=["Config"]) if argv[0] == "-m" else __import__(argv[0][:-3])
        flags = argv[2:] if argv[0] == "-m" else argv[1:]
        config.parse(module.Config, flags, tiny=getattr(module, "TINY", None))  # raises UserError on a bad flag
        checked += 1
    assert checked >= (10 if path.endswith("course.md") else 2)


def test_the_exercise_table_is_what_the_generator_blanks():
    rows = dict(re.findall(r"^\| `(\w+)\.py` \| ([^|]+) \|", text(DOCS[1]), re.M))
    assert list(rows) == trainers.TRAINERS
    for t, cell in rows.items():
        assert re.findall(r"`(\w+)`", cell) == exercise.algorithm_functions(t), t


def test_the_ablation_table_is_what_the_script_draws_from_the_committed_log():
    runs, walls = ablations.load(LOG)
    assert list(runs) == list(ablations.ABLATIONS)
    for name, seeds in runs.items():
        assert len(seeds) == 3 and all(rows[-1]["step"] == grpo.TINY["num_steps"] for rows in seeds), name
        assert len(walls[name]) == 3
    block = re.search(r"<!-- ablations begin -->\n(.*?)\n<!-- ablations end -->", text(DOCS[0]), re.S).group(1)
    assert block == ablations.table(runs, walls)


def test_each_ablation_changes_what_it_names_and_nothing_else():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=F64)
    assert torch.equal(ablations.no_baseline(r, 4), r)
    assert torch.allclose(ablations.no_std(r, 4), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64))
    new, old, ref, mask, rewards = toy()
    adv = grpo.group_advantages(rewards, 4)
    # no length normalisation: Σ_t over max_len for every sequence (an independent sum), same clip and KL
    loss, _ = ablations.no_length_norm(10)(new, old, ref, adv, mask, 0.2, 0.04)
    ratio, m = torch.exp(new - old), mask.to(F64)
    per_token = torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) - 0.04 * grpo.kl_k3(new, ref)
    assert loss.item() == pytest.approx(-((per_token * m).sum(1) / 10).mean().item(), abs=1e-12)
    # no clip: dJ/dlogπ = ρ Â / |o_i| on every token, the clipped ones included
    loss, g = value_and_dj(ablations.no_clip(new, old, ref, adv, mask, 0.2, 0.0)[0], new)
    want = (ratio * adv[:, None] * m / m.sum(1, keepdim=True)) / len(adv)
    assert torch.allclose(g, want, atol=1e-12)
    clipped = grpo.policy_loss(new, old, ref, adv, mask, 0.2, 0.0)[1]["clip_frac"][0]
    assert clipped > 0  # the toy has tokens GRPO's clip removes, and no_clip keeps them
    assert ablations.ABLATIONS["off_policy"][1:] == ({}, ["--num_minibatches=8"])


def test_a_run_takes_its_ablation_and_the_log_keeps_it(tmp_path, tiny_dir):
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "tools.ablations", "--ablations=no_clip", "--seeds=1", f"--out_dir={out}",
            f"--metrics={tmp_path / 'log.jsonl'}", f"--figure={tmp_path / 'a.png'}",
            "--extra=--num_steps=2 --eval_problems=4"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ablation no_clip: 8 steps per rollout and ε = inf" in (out / "no_clip-s0" / "stdout.log").read_text()
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    steps = [r for r in rows if "clip_frac" in r]
    assert len(steps) == 2 and all(r["clip_frac"] == 0.0 for r in steps)  # ε = inf clips nothing, on any build
    assert json.load(open(out / "no_clip-s0" / "config.json"))["num_minibatches"] == 8
    assert rows[-1]["wall_s"] > 0 and "| no_clip |" in p.stdout


def test_user_errors(tmp_path, capsys, monkeypatch):
    assert "unknown ablation(s) ['no_kl']" in cli_error(ablations, ["--ablations=no_kl"], capsys, monkeypatch)
    line = cli_error(ablations, ["--logs_only", f"--metrics={tmp_path / 'none.jsonl'}"], capsys, monkeypatch)
    assert "no ablation log" in line
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    assert "bad.jsonl:1: not a row" in cli_error(ablations, ["--logs_only", f"--metrics={tmp_path / 'bad.jsonl'}"],
                                                capsys, monkeypatch)
