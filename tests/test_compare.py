"""tools/compare.py reads metrics logs, aggregates over seeds, and writes the table (and figure)."""
import errno
import json
import os
import sys

import pytest

from tools import compare, output
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


@pytest.mark.parametrize("text,words", [
    ('{"step": 0, "eval/strict": "x"}\n', "metrics.jsonl:1: 'eval/strict' is 'x', not a number or null"),
    ('{"step": 0, "eval/strict": 0.3, "reward": [1]}\n', "metrics.jsonl:1: 'reward' is [1], not a number or null"),
    ('{"step": true, "eval/strict": 0.3}\n', "metrics.jsonl:1: not a metrics row (no integer 'step')"),
    ('{"step": 0, "eval/strict": null}\n', "holds no held-out evaluation (an empty or unfinished run)"),
    ('{"step": 0, "eval/strict": 0.3}\n{"step": 1, "rew', "metrics.jsonl:2: not valid JSON"),  # cut short
])
def test_a_damaged_or_unfinished_log_is_one_line(text, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "grpo-s0").mkdir()
    (tmp_path / "grpo-s0" / "metrics.jsonl").write_text(text)
    line = cli_error(compare, ["--logs_only", "--algos=grpo", "--seeds=1", f"--out_dir={tmp_path}"], capsys, monkeypatch)
    assert words in line and "run it again without --logs_only" in line, line


def test_a_log_without_every_metric_still_makes_a_table(tmp_path):
    """Rows as an unfinished run leaves them: evaluations only (no response length), a null where nothing was
    counted, SAPO's gate with one side missing: n/a in the table, no traceback."""
    (tmp_path / "sapo-s0").mkdir()
    (tmp_path / "sapo-s0" / "metrics.jsonl").write_text(
        '{"step": 0, "eval/strict": 0.3}\n{"step": 1, "gate_weight_pos": 0.9, "entropy": null, "eval/strict": 0.4}\n')
    cfg = compare.Config(algos="sapo", seeds=1, out_dir=str(tmp_path), logs_only=True)
    runs = compare.load_runs(cfg.out_dir, ["sapo"], 1)
    assert compare.table(cfg, runs).splitlines()[-1] == "| sapo | 0.300 | **0.400 ± 0.000** | 0.400 | not reached | n/a | n/a |"
    assert compare.series(runs["sapo"], compare.trust_region) == []


def test_odd_out_dirs_and_figures_are_one_line_before_anything_runs(tmp_path, tiny_dir, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    fake_run(tmp_path / "runs" / "grpo-s0", 0.6)
    monkeypatch.setattr(compare, "run_all", lambda *a: pytest.fail("a run started"))
    logs = ["--logs_only", "--algos=grpo", "--seeds=1"]
    for argv, words in [
            ([*logs, f"--out_dir={tmp_path / 'file'}"], "is not a folder of runs named <algo>-s<seed>"),
            ([*logs, f"--out_dir={tmp_path / 'none'}"], "is not a folder of runs named <algo>-s<seed>"),
            (["--algos=grpo", f"--out_dir={tmp_path / 'file'}"], f"--out_dir={tmp_path / 'file'} is a file, not a folder"),
            (["--algos=grpo", f"--out_dir={tmp_path / 'file' / 'sub'}"], "is not a writable folder (Not a directory)"),
            ([*logs, f"--out_dir={tmp_path / 'runs'}", "--figure=fig.jpg"], "--figure=fig.jpg: give a path ending in .png"),
            ([*logs, f"--out_dir={tmp_path / 'runs'}", f"--figure={tmp_path / 'file' / 'f.png'}"],
             f"its folder {tmp_path / 'file'} is a file, not a folder")]:
        assert words in cli_error(compare, argv, capsys, monkeypatch)

    def read_only(*a, **k):  # emulated: a root user writes through permissions
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(output.tempfile, "TemporaryFile", read_only)
    line = cli_error(compare, [*logs, f"--out_dir={tmp_path / 'runs'}"], capsys, monkeypatch)
    assert line.endswith(f"--out_dir={tmp_path / 'runs'} is not a writable folder (Read-only file system): pick another")


def test_a_full_disk_is_one_line_and_leaves_no_partial_table(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path / "grpo-s0", 0.6)

    def full(path, *a, **k):  # emulated: a write on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(output, "open", full, raising=False)
    line = cli_error(compare, ["--logs_only", "--algos=grpo", "--seeds=1", f"--out_dir={tmp_path}"], capsys, monkeypatch)
    assert f"cannot write {tmp_path / 'summary.md'}: No space left on device" in line
    assert sorted(os.listdir(tmp_path)) == ["grpo-s0"]


def test_a_file_where_a_run_dir_goes_stops_before_any_run(tmp_path, tiny_dir, capsys, monkeypatch):
    (tmp_path / "grpo-s0").write_text("x")
    line = cli_error(compare, ["--algos=grpo", "--seeds=1", f"--out_dir={tmp_path}"], capsys, monkeypatch)
    assert f"cannot start the run in {tmp_path / 'grpo-s0'}: File exists" in line


@pytest.mark.parametrize("extra", ["--seed=5", "--run_dir=runs/x", "--num_steps=2 --tiny=false", "--overwrite",
                                   "--resume=runs/grpo-tiny"])
def test_extra_flags_that_would_make_every_seed_one_run_are_refused(extra, tmp_path, capsys, monkeypatch):
    line = cli_error(compare, ["--algos=grpo", f"--extra={extra}", f"--out_dir={tmp_path}"], capsys, monkeypatch)
    assert f"--extra={extra!r} sets {extra.split()[-1]}: compare sets each run's seed and run dir itself" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,words", [(["--threshold=1.5"], "--threshold=1.5 is out of range: it must be in [0, 1]"),
                                        (["--threshold=-0.1"], "--threshold=-0.1 is out of range"),
                                        (["--threshold=nan"], "--threshold=nan is not a number"),
                                        (["--algos=grpo,grpo"], "names a trainer twice")])
def test_bad_settings_are_one_line(argv, words, tmp_path, capsys, monkeypatch):
    assert words in cli_error(compare, [*argv, "--logs_only", f"--out_dir={tmp_path}"], capsys, monkeypatch)
