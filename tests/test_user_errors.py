"""Nothing silently wrong: the answer parser, run directories, settings and error messages.

Each test states a requirement and the fault it keeps out; together they cover the numbered items of the
"nothing silently wrong" issue.
"""
import json
import os
import sys
from fractions import Fraction

import pytest
import torch

from grpo_family import checkpoint, config, evaluation, gsm8k, loading
import grpo
from helpers import ROOT, cli_error, fails, run_main, single_process

FAST = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0"]


def user_error(argv, match, main=grpo.main, monkeypatch=None):
    """Call a script's main() in process with argv; assert it raises a UserError matching `match`."""
    with pytest.raises((config.UserError, gsm8k.DataError), match=match):
        monkeypatch.setattr(sys, "argv", ["grpo.py", *argv])
        main()


# -----------------------------------------------------------------------------
# 1. the answer parser's work is flat in the completion's length: a 1 MB adversarial completion costs what a short
# one does: linear in it, not quadratic. Counted, not timed, so a
# loaded machine cannot make it flaky: every regex the readers run is metered by the characters it may read.

ADVERSARIAL = {
    "whitespace run": "#### " + " " * 1_000_000 + "x",
    "answer then whitespace": "#### 18" + " " * 1_000_000,
    "digit run": "#### " + "9" * 1_000_000,
    "digits and spaces": "1 " * 500_000,
    "separators": ", ." * 333_333 + "#### 18",
    "invisible characters": "\u200b" * 1_000_000 + "18",
    "signs and dollars": "-$ " * 333_333 + "5",
    "fractions": "#### " + "1/" * 500_000,
    "thousands commas": "#### " + "1," * 524_288,
    "commas at the end": "1," * 524_288 + "1",
    "exponent run": "#### 1e" + "5" * 1_000_000,
}


class Metered:
    """A compiled regex that adds to `read` the characters each call may examine (its pos..endpos window)."""

    def __init__(self, pattern, read):
        self.pattern, self.read = pattern, read

    def __getattr__(self, name):
        method = getattr(self.pattern, name)

        def call(string, pos=0, endpos=sys.maxsize):
            self.read[0] += min(endpos, len(string)) - pos
            return method(string, pos, endpos)
        return call


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_a_megabyte_of_adversarial_text_costs_what_a_short_one_does(name, monkeypatch):
    text, read = ADVERSARIAL[name], [0]
    assert len(text) >= 999_990
    for key in ("_TOKEN", "_RTOKEN", "_SKIP"):  # _DIGIT, a one-character class, is the one scan over the whole text
        monkeypatch.setattr(gsm8k, key, Metered(getattr(gsm8k, key), read))
    for fn in (gsm8k.correctness_reward, gsm8k.lenient_correct, gsm8k.format_reward):
        fn(text, "#### 18")
    evaluation.score_problem(0, {"question": "q", "answer": "#### 18"}, [text], [False])
    assert read[0] <= 30 * (gsm8k._MAX_NUMBER + gsm8k._NEAR), f"{name}: the regexes read {read[0]:,} characters"


def test_numbers_past_the_length_limit_are_no_match():
    big = "7" * gsm8k._MAX_NUMBER
    assert gsm8k.extract_answer(f"####{big}") is not None and gsm8k.extract_answer(f"####{big}7") is None
    assert gsm8k.extract_last_number(f"so {big}7") is None and gsm8k.format_reward(f"#### {big}7") == 0.0
    assert gsm8k.extract_answer("#### 1," + "000," * 5000 + "000") is None  # cut by the window: never 1,000
    assert gsm8k.extract_last_number("1," + "000," * 5000 + "000") is None
    assert gsm8k.extract_answer("#### 18" + " " * 100 + "5") == 18  # blanks past _NEAR separate numbers
    assert gsm8k.extract_answer("#### 18 5") is None


# -----------------------------------------------------------------------------
# 2. a number the parser cannot read exactly is no match, never a different number; digits are ASCII


@pytest.mark.parametrize("completion,reference,score", [
    ("#### \u22123", "#### 3", 0.0),        # the Unicode minus keeps its sign (not read as 3)
    ("#### \u22123", "#### -3", 1.0),
    ("#### 1e5", "#### 100000", 1.0),       # exponents are read (not as 1)
    ("#### 2.5e3", "#### 2500", 1.0),
    ("#### 2.5e3", "#### 2.5", 0.0),
    ("#### 1 234", "#### 1", 0.0),          # digit groups split by a space: ambiguous, no match (not 1)
    ("#### 1 234", "#### 1234", 0.0),
    ("#### 1\u200b234", "#### 1", 0.0),     # ... or by an invisible character
    ("#### 3 1/2", "#### 3", 0.0),          # a mixed number is 7/2 (not 3)
    ("#### 3 1/2", "#### 3.5", 1.0),
    ("#### \u0661\u0668", "#### 18", 0.0),  # Arabic-Indic digits are not read (not as 18)
    ("#### \uff11\uff18", "#### 18", 0.0),  # nor full-width ones
    ("#### 12,34", "#### 1234", 0.0),       # badly grouped thousands: ambiguous
    ("#### 1.5.3", "#### 1.5", 0.0),
    ("#### 18", "18", 1.0),                 # a bare reference number is read (or every completion scores 0)
    ("#### 17", "18", 0.0),
])
def test_careful_grader_decisions(completion, reference, score):
    assert gsm8k.correctness_reward(completion, reference) == score
    assert gsm8k.lenient_correct(completion.replace("####", "so"), reference) == score


def test_giant_equal_answers_match():
    big = "7" * 5000  # past Python's 4,300-digit int conversion limit (still read exactly)
    assert gsm8k.correctness_reward(f"#### {big}", f"#### {big}") == 1.0
    assert gsm8k.correctness_reward(f"#### {big}8", f"#### {big}") == 0.0
    assert gsm8k.extract_answer(f"#### {big}000") == gsm8k.extract_answer(f"#### {big}e3")


def test_numbers_compare_exactly_with_fractions_and_ints():
    assert gsm8k.extract_answer("#### $1,234.50") == Fraction(2469, 2)
    assert gsm8k.extract_answer("#### 0.75") == gsm8k.extract_answer("#### 3/4") == Fraction(3, 4)
    assert gsm8k.extract_answer("#### 1/3") == Fraction(1, 3) and str(gsm8k.extract_answer("#### 1/3")) == "1/3"
    assert gsm8k.extract_answer("#### -0") == 0 and gsm8k.extract_answer("#### 007") == 7


def test_bad_references_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no readable '#### <number>' line"):
        gsm8k.correctness_reward("#### 18", "eighteen")  # not silently 0 for every completion
    with pytest.raises(TypeError, match="completion must be a string, got int"):
        gsm8k.correctness_reward(18, "#### 18")          # not an unhelpful TypeError
    with pytest.raises(TypeError, match="reference answer must be a string, got int"):
        gsm8k.correctness_reward("#### 18", 18)          # an error, not a score of 0
    with pytest.raises(TypeError, match="completion must be a string"):
        gsm8k.format_reward(None)


# -----------------------------------------------------------------------------
# 3 and 8. run directories hold one run; resume compares settings; `latest` always names a checkpoint


def test_a_fresh_run_into_a_used_run_dir_stops_and_overwrite_starts_over(tiny_dir, tmp_path, capsys, monkeypatch):
    r = tmp_path / "R"
    run_main(grpo, [*FAST, "--num_steps=3", "--save_every=1", f"--run_dir={r}"], monkeypatch)
    # a second run must not train there and then delete what `latest` names
    line = cli_error(grpo, [*FAST, "--num_steps=1", f"--run_dir={r}"], capsys, monkeypatch)
    assert all(w in line for w in ("already holds another run", "--resume=", "--overwrite")), line
    run_main(grpo, [*FAST, "--num_steps=1", f"--run_dir={r}", "--overwrite"], monkeypatch)
    assert sorted(x for x in os.listdir(r) if x.startswith("ckpt")) == ["ckpt-000001"]
    assert (r / "latest").read_text() == "ckpt-000001" and (r / "ckpt-000001" / "trainer_state.pt").is_file()
    assert [json.loads(l)["step"] for l in open(r / "metrics.jsonl")] == [0, 1]  # only the new run's log


def test_resume_refuses_changed_settings_and_allows_more_steps(tiny_dir, tmp_path, capsys, monkeypatch):
    r = tmp_path / "R"
    run_main(grpo, [*FAST, "--num_steps=1", f"--run_dir={r}"], monkeypatch)
    # --resume must not continue silently with another seed and learning rate
    msg = cli_error(grpo, [*FAST, "--num_steps=2", f"--run_dir={r}", f"--resume={r}", "--lr=1e-3", "--seed=5"],
                    capsys, monkeypatch)
    assert "saved with other settings" in msg
    assert "--lr=0.001 (saved: 0.0002)" in msg and "--seed=5 (saved: 0)" in msg
    user_error([*FAST, "--num_steps=1", f"--run_dir={r}", f"--resume={r}"], "at step 1 and --num_steps=1: nothing to do",
               monkeypatch=monkeypatch)  # not exit 0, saying nothing
    run_main(grpo, [*FAST, "--num_steps=2", f"--run_dir={r}", f"--resume={r}"], monkeypatch)
    assert (r / "latest").read_text() == "ckpt-000002"


def test_resume_without_run_dir_goes_on_where_the_checkpoint_is(tiny_dir, tmp_path, monkeypatch):
    """Item 10: --resume=<a custom run dir> without --run_dir went on into runs/grpo-tiny (or was refused there)."""
    r = tmp_path / "R"
    run_main(grpo, [*FAST, "--num_steps=1", f"--run_dir={r}"], monkeypatch)
    monkeypatch.chdir(tmp_path)  # the default run dir would be tmp_path/runs/grpo-tiny
    for n, resume in [(2, r), (3, r / "latest"), (4, r / "ckpt-000003")]:  # a run dir, its `latest` file, a ckpt
        run_main(grpo, [*FAST, f"--num_steps={n}", f"--resume={resume}"], monkeypatch)
        assert (r / "latest").read_text() == f"ckpt-{n:06d}"
    assert [json.loads(l)["step"] for l in open(r / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "runs").exists()


def fake_checkpoint(run_dir, step, run_id):
    """A directory save_checkpoint would write (the files the loader looks for), for run `run_id`."""
    ckpt = run_dir / f"ckpt-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"x")
    (ckpt / "config.json").write_text("{}")
    (ckpt / "run_config.json").write_text(json.dumps({"config": {}, "run_id": run_id, "step": step}))
    return ckpt


def test_cleanup_deletes_only_this_runs_checkpoints(tiny_dir, tmp_path):
    lm, tok = loading.model(tiny_dir, torch.device("cpu")), loading.tokenizer(tiny_dir)
    cfg = grpo.Config(run_dir=str(tmp_path))
    fake_checkpoint(tmp_path, 1, "someone-else")  # another run's checkpoint, e.g. copied in by hand
    (tmp_path / "run_id").write_text("me")
    opt = torch.optim.AdamW(lm.parameters())
    for step in (5, 6, 7):
        checkpoint.save(str(tmp_path), step, lm, tok, opt, cfg, single_process())
    assert sorted(x for x in os.listdir(tmp_path) if x.startswith("ckpt")) == ["ckpt-000001", "ckpt-000006",
                                                                                 "ckpt-000007"]
    assert (tmp_path / "latest").read_text() == "ckpt-000007"


def test_a_crash_while_re_saving_leaves_latest_loadable(tmp_path):
    # the window: the old copy renamed away, the complete new one still in .tmp (`latest` must still name a complete one)
    fake_checkpoint(tmp_path, 3, "me").rename(tmp_path / "ckpt-000003.tmp")
    (tmp_path / "latest").write_text("ckpt-000003")
    assert checkpoint.find(str(tmp_path)) == str(tmp_path / "ckpt-000003.tmp")
    assert loading.model_path(str(tmp_path), single_process()) == str(tmp_path / "ckpt-000003.tmp")


def test_damaged_checkpoint_files_are_named(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 2, "me")  # trainer_state.pt holds two bytes: not a torch file
    with pytest.raises(config.UserError, match=r"trainer_state.pt: cannot read this checkpoint file"):
        checkpoint.restore(str(ckpt), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                                  single_process())
    (ckpt / "run_config.json").write_text("{not json")
    with pytest.raises(config.UserError, match=r"run_config.json: cannot read the checkpoint's settings"):
        checkpoint.start_run(grpo.Config(resume=str(ckpt), run_dir=str(tmp_path / "new")), single_process())


# -----------------------------------------------------------------------------
# 4, 5, 6. data paths, --tiny with explicit flags, settings checked once, up front


def test_a_single_data_file_is_not_used_as_held_out_data(tmp_path, monkeypatch):
    rows = [{"question": "q", "answer": "#### 1"}]
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = grpo.Config(data_path=str(tmp_path / "train.jsonl"))
    assert loading.problems(cfg, "train") == rows
    with pytest.raises(config.UserError, match="single file, so nothing is held out.*--test_path"):
        loading.problems(cfg, "test")  # never the training file, evaluated as "held-out"
    cfg.test_path = str(tmp_path / "train.jsonl")
    assert loading.problems(cfg, "test") == rows


def test_tiny_honours_an_explicit_model(monkeypatch, tmp_path):
    # --tiny must not replace an explicit --model
    user_error(["--tiny", "--model=/nonexistent", f"--run_dir={tmp_path}"], "/nonexistent does not exist",
               monkeypatch=monkeypatch)


@pytest.mark.parametrize("flag,value", [
    ("save_every", "0"), ("num_minibatches", "0"), ("micro_batch_size", "0"), ("batch_prompts", "0"),
    ("group_size", "0"), ("group_size", "1"), ("num_steps", "0"), ("top_p", "0"), ("beta", "-1"),
    ("clip_eps", "-1"), ("temperature", "-0.5"), ("lr", "0"), ("max_new_tokens", "0"),
])
def test_out_of_range_settings_stop_before_anything_runs(flag, value):
    # each stops before any work, with one line
    with pytest.raises(config.UserError, match=f"--{flag}={value}.* out of range: it must be in"):
        config.parse(grpo.Config, ["--tiny", f"--{flag}={value}"], tiny=grpo.TINY)


def test_user_errors_exit_2_with_one_line():
    """As a command, `python grpo.py ...`: exit 2 and one line, no traceback (in process: test_trainers.py)."""
    fails(["--tiny", "--group_size=1"], "--group_size=1", "[2, inf)")  # not a run that learns nothing


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    line = cli_error(grpo, [*FAST, "--num_steps=1", f"--run_dir={tmp_path}", f"--resume={tmp_path / 'none'}"],
                     capsys, monkeypatch)
    assert "no checkpoint at" in line


# -----------------------------------------------------------------------------
# 7. data, checkpoint and model errors name the file, the line (1-based) and the fix


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer": #### 2}\n')
    with pytest.raises(gsm8k.DataError, match=r"train.jsonl:3: not valid JSON"):  # the file and line, not pyarrow's 73 lines
        gsm8k.load_gsm8k("train", str(path))
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": 2}\n')
    with pytest.raises(gsm8k.DataError, match=r"train.jsonl:2: 'answer' must be a string, got int"):
        gsm8k.load_gsm8k("train", str(path))  # names the missing field of the row


def test_data_errors_exit_2_from_the_trainer(tmp_path, capsys, monkeypatch):
    (tmp_path / "train.jsonl").write_text("[1, 2]\n")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    line = cli_error(grpo, ["--tiny", f"--data_path={tmp_path}", f"--run_dir={tmp_path / 'r'}"], capsys, monkeypatch)
    assert "train.jsonl:1: expected a JSON object" in line


def test_model_load_errors_keep_their_cause(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')  # a local dir with no weights in it
    with pytest.raises(config.UserError, match=f"cannot load the model in {tmp_path}: OSError") as e:
        loading.model(str(tmp_path), torch.device("cpu"))
    assert "hub" not in str(e.value)  # the real cause, not "not on the hub or no network"


def test_a_run_dir_without_latest_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # what a run writes before its first checkpoint
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(config.UserError, match="a run dir with no `latest` checkpoint yet"):
        loading.model_path(str(tmp_path), single_process())  # named as a run dir, not a tokenizer error


def test_sample_prompt_file_errors_give_the_real_line(tmp_path, monkeypatch):
    import sample
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "a"}\n\n\n{"question": 3}\n')
    with pytest.raises(config.UserError, match=r"p.jsonl:4: expected a JSON object with a string field"):
        sample.read_prompt_file(str(path))  # the file's own line number, blank lines counted
    path.write_text('{"question": "a"}\n\n{oops\n')
    with pytest.raises(gsm8k.DataError, match=r"p.jsonl:3: not valid JSON"):
        sample.read_prompt_file(str(path))


def test_every_json_reader_refuses_a_deeply_nested_or_huge_file_in_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    """100,000 '[' (Python's reader alone: a RecursionError traceback) and a file past the size bound, in every
    reader of JSON: the data, a checkpoint's settings, a tokenizer's config, a resumed run's log, the tools' logs."""
    import shutil
    from grpo_family import jsonfile
    from tools import ablations, compare, memory
    deep = "[" * 100_000
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    data = str(tmp_path / "deep.jsonl")
    line = cli_error(grpo, ["--tiny", f"--data_path={data}", f"--test_path={data}", f"--run_dir={tmp_path / 'r'}"],
                     capsys, monkeypatch)
    assert "deep.jsonl:1: nested deeper than 100 levels" in line and "each line must be one JSON object" in line
    ckpt = fake_checkpoint(tmp_path / "run", 1, "r")
    (ckpt / "run_config.json").write_text(deep)
    with pytest.raises(config.UserError, match="run_config.json: nested deeper than 100 levels"):
        checkpoint.read_run_config(str(ckpt))
    tok = tmp_path / "tok"
    shutil.copytree(tiny_dir, tok)
    (tok / "tokenizer_config.json").write_text(deep)
    with pytest.raises(config.UserError, match="tokenizer_config.json: nested deeper than 100 levels"):
        loading.tokenizer(str(tok))
    with pytest.raises(config.UserError, match="metrics.jsonl:3: nested deeper than 100 levels"):
        checkpoint._step(deep, "metrics.jsonl:3")
    (tmp_path / "logs" / "grpo-s0").mkdir(parents=True)
    (tmp_path / "logs" / "grpo-s0" / "metrics.jsonl").write_text(deep)
    for module, argv, words in [
            (compare, ["--logs_only", "--algos=grpo", "--seeds=1", f"--out_dir={tmp_path / 'logs'}"], "nested deeper"),
            (memory, [f"--compare={data}"], "nested deeper"), (ablations, ["--logs_only", f"--metrics={data}"],
                                                               "deep.jsonl:1: not a row of the ablation log")]:
        assert words in cli_error(module, argv, capsys, monkeypatch)
    text = '{"a": [[1], "' + "[{" * 200 + '\\"]"]}'  # brackets inside a string (an escaped quote too) nest nothing
    assert jsonfile.loads(text, "x.json") == {"a": [[1], "[{" * 200 + '"]']}
    import time
    for crafted in ('"\\' * 500_000 + "[" * 200, '"' + "[" * 1_000_000):  # quotes that never close: a linear scan
        t0 = time.time()
        with pytest.raises(jsonfile.JSONError, match="x.json: not valid JSON"):
            jsonfile.loads(crafted, "x.json")
        assert time.time() - t0 < 10, time.time() - t0  # 0.05 s and 0.25 s here; a quadratic scan ran for minutes
    monkeypatch.setattr(jsonfile, "MAX_CHARS", 10)  # the size bound: the same one line
    with pytest.raises(jsonfile.JSONError, match=r"x.json: over 10 characters"):
        jsonfile.loads('{"a": "0123456789"}', "x.json")


def test_hub_commands_without_a_network_end_in_one_line_naming_the_local_alternatives(tmp_path):
    """Reliability item 10: offline, the hub loads ended after the client's retries in a raw traceback. HF_HUB_OFFLINE
    fails at once where a missing network would retry for ~25 s; an empty HF_HOME: nothing cached to fall back on."""
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    for argv, words in [(["eval_gsm8k.py", f"--out_dir={tmp_path / 'e'}"], ["GSM8K", "--data_path=", "--tiny"]),
                        (["grpo.py", f"--data_path={data}", f"--run_dir={tmp_path / 'r'}"], ["--model=", "--tiny"])]:
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert lines[0].startswith(f"{argv[0]}: error: cannot load") and "hub" in lines[0], lines[0]
        assert all(w in lines[0] for w in words), lines[0]
