"""tools/compare.py reads metrics logs, aggregates over seeds, and writes the table (and figure)."""
import json
import os
import sys

import pytest

from tools import compare
from helpers import cli_error, fails


def fake_run(path, finals, clip_key="clip_frac"):
    path.mkdir(parents=True)
    rows = [{"step": 0, "eval/strict": 0.3}]
    for step in (1, 2):
        rows.append({"step": step, "reward": 0.1 * step, "accuracy": 0.1 * step, "response_length": 20 + step,
                     "entropy": 0.2, clip_key: 0.01, **({"gate_weight_neg": 0.9} if clip_key == "gate_weight_pos" else {})})
    rows[-1]["eval/strict"] = finals
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(path / "wall_time.json", "w") as f:
        json.dump({"wall_s": 10.0}, f)


def test_table_from_logs(tmp_path):
    fake_run(tmp_path / "grpo-s0", 0.6)
    fake_run(tmp_path / "grpo-s1", 0.4)
    fake_run(tmp_path / "sapo-s0", 0.5, clip_key="gate_weight_pos")
    fake_run(tmp_path / "sapo-s1", 0.5, clip_key="gate_weight_pos")
    cfg = compare.Config(algos="grpo,sapo", seeds=2, out_dir=str(tmp_path), threshold=0.55, logs_only=True)
    runs = compare.load_runs(cfg.out_dir, ["grpo", "sapo"], 2)
    text = compare.table(cfg, runs)
    grpo_line = next(l for l in text.splitlines() if l.startswith("| grpo"))
    assert "**0.500 ± 0.100**" in grpo_line and "0.600, 0.400" in grpo_line
    assert "2 (1/2 seeds)" in grpo_line and "10 s" in grpo_line
    assert "not reached" in next(l for l in text.splitlines() if l.startswith("| sapo"))
    pts = compare.series(runs["sapo"], compare.trust_region)
    assert pts[0][1] == pytest.approx(1 - 0.5 * (0.01 + 0.9))


def test_logs_only_cli_and_missing_log_error(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path / "grpo-s0", 0.6)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--logs_only", "--algos=grpo", "--seeds=1", f"--out_dir={tmp_path}"])
    compare.main()
    assert "| grpo |" in capsys.readouterr().out and (tmp_path / "summary.md").exists()
    # exit 2 and one line, no traceback
    assert "no log" in cli_error(compare, ["--logs_only", "--algos=grpo", "--seeds=2", f"--out_dir={tmp_path}"],
                                 capsys, monkeypatch)
    assert "unknown trainer" in cli_error(compare, ["--logs_only", "--algos=nope", f"--out_dir={tmp_path}"], capsys,
                                          monkeypatch)
    log = tmp_path / "grpo-s1" / "metrics.jsonl"
    log.parent.mkdir()
    for text, words in [("", "holds no held-out evaluation"), ('{"step": 1}\n{bad', "metrics.jsonl:2: not valid JSON"),
                        ('[1]\n', "metrics.jsonl:1: not a metrics row"), ('{"step": 1, "reward": 0.5}\n', "no held-out")]:
        log.write_text(text)
        assert words in cli_error(compare, ["--logs_only", "--algos=grpo", "--seeds=2", f"--out_dir={tmp_path}"],
                                  capsys, monkeypatch)


def test_an_out_dir_that_holds_a_model_or_a_run_is_refused(tmp_path, tiny_dir, capsys, monkeypatch):
    """compare writes summary.md and compare.png into --out_dir: never into a model dir or a run dir."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_id").write_text("r")
    for where in (tiny_dir, run):
        line = cli_error(compare, ["--logs_only", "--algos=grpo", f"--out_dir={where}"], capsys, monkeypatch)
        assert "holds a model or a run" in line, line
    assert sorted(os.listdir(run)) == ["run_id"]


def test_a_damaged_wall_time_file_is_named_not_skipped(tmp_path):
    (tmp_path / "grpo-s0").mkdir()
    for text, words in [("[1]", "no number 'wall_s'"), ('{"wall_s": "5"}', "no number 'wall_s'"), ("{", "not valid JSON")]:
        (tmp_path / "grpo-s0" / "wall_time.json").write_text(text)
        with pytest.raises(compare.config.UserError, match=words):
            compare.wall_time(str(tmp_path), "grpo", 0)
    (tmp_path / "grpo-s0" / "wall_time.json").write_text('{"wall_s": 12.5}')
    assert compare.wall_time(str(tmp_path), "grpo", 0) == 12.5 and compare.wall_time(str(tmp_path), "grpo", 1) is None


def test_a_failed_run_stops_the_others(tmp_path, tiny_dir):
    import os
    # grpo.py refuses DAPO's flag at once; dapo.py, still training, must be stopped with it, not left running
    # (processes of their own: tools/compare.py launches the trainers as processes)
    line = fails(["--algos=grpo,dapo", "--seeds=1", "--jobs=2", "--extra=--clip_eps_high=0.28", f"--out_dir={tmp_path}"],
                 "grpo-s0 failed with exit code 2", "stopped the runs still going: dapo-s0", script="tools/compare.py")
    alive = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if str(tmp_path).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                alive.append(pid)
        except (FileNotFoundError, ProcessLookupError):  # a process that ended while we listed them
            continue
    assert not alive, (line, alive)
