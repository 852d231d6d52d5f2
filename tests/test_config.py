"""Config parsing: overrides, --tiny, and clear errors on typos and bad types (what every trainer's settings and
--help must hold, for all sixteen: test_trainers.py)."""
import dataclasses
import json

import pytest

from grpo_family import config, logs
import grpo


def test_defaults_and_overrides():
    cfg = config.parse(grpo.Config, [], tiny=grpo.TINY)
    assert cfg == dataclasses.replace(grpo.Config(), run_dir="runs/grpo")  # the run dir is named after the file
    cfg = config.parse(grpo.Config, ["--lr=3e-6", "--group_size=16", "--beta=0", "--model=./m"], tiny=grpo.TINY)
    assert (cfg.lr, cfg.group_size, cfg.beta, cfg.model) == (3e-6, 16, 0.0, "./m")


def test_tiny_overrides_and_explicit_flags_win():
    cfg = config.parse(grpo.Config, ["--tiny", "--num_steps=3"], tiny=grpo.TINY)
    assert cfg.tiny and cfg.num_steps == 3 and cfg.run_dir == "runs/grpo-tiny"
    assert cfg.lr == grpo.TINY["lr"] and cfg.system_prompt == "" and (cfg.model, cfg.data_path) == ("tiny", "tiny")
    cfg = config.parse(grpo.Config, ["--tiny", "--model=/m", "--data_path=/d", "--run_dir=R"], tiny=grpo.TINY)
    assert (cfg.model, cfg.data_path, cfg.run_dir) == ("/m", "/d", "R")


@pytest.mark.parametrize("argv,msg", [
    (["--lerning_rate=1"], "unknown config key --lerning_rate"),
    (["--group_size=eight"], "expects an integer"),
    (["--lr=fast"], "expects a number"),
    (["--tiny=maybe"], "expects a boolean"),
    (["--lr"], "needs a value"),
    (["lr=1"], "unexpected argument"),
])
def test_bad_input_gives_clear_error(argv, msg):
    with pytest.raises(config.UserError, match=msg):
        config.parse(grpo.Config, argv, tiny=grpo.TINY)


def test_unknown_key_error_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        config.parse(grpo.Config, ["--nope=1"])
    for f in dataclasses.fields(grpo.Config):
        assert f.name in str(e.value)


def test_fresh_run_starts_a_fresh_log_and_resume_appends(tmp_path):
    for cfg in (grpo.Config(), grpo.Config()):  # two fresh runs in the same run dir
        logs.Logger(str(tmp_path), cfg, True).log(1, {"reward": 0.5})
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 1
    logs.Logger(str(tmp_path), grpo.Config(resume=str(tmp_path)), True).log(2, {"reward": 0.7})
    assert [l.count('"step"') for l in open(tmp_path / "metrics.jsonl")] == [1, 1]
    assert json.loads(open(tmp_path / "config.json").read())["resume"] == str(tmp_path)
