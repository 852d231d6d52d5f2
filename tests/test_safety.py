"""Nothing runs, nothing is lost: a crafted checkpoint never executes code, and a diverged update stops the run
before it is logged or saved (the safety issue's items 1 and 2)."""
import errno
import importlib
import json
import os
import shutil
import sys
import unicodedata
from fractions import Fraction

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import eval_gsm8k
import grpo
import sample
from grpo_family import checkpoint, config, gsm8k, loading, logs, rollout
from helpers import cli_error, run_main, single_process
from tools import bench, trainers

FAST = ["--tiny", "--batch_prompts=4", "--group_size=4", "--eval_problems=8", "--eval_every=0"]


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint would do to the person who resumes it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, tiny_dir, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_main(grpo, [*FAST, "--num_steps=1", f"--run_dir={run_dir}"], monkeypatch)
    state_path = run_dir / "ckpt-000001" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)  # what the run wrote is plain data
    marker = tmp_path / "payload-ran"
    state["extra"] = {"x": Payload(marker)}  # loading must refuse it, never run the command
    torch.save(state, state_path)
    line = cli_error(grpo, [*FAST, "--num_steps=2", f"--run_dir={run_dir}", f"--resume={run_dir}"], capsys, monkeypatch)
    assert all(w in line for w in ("trainer_state.pt: refused", "objects that loading would run", "posix.system"))
    assert not marker.exists(), f"the payload ran: {line}"
    rng_path = run_dir / "ckpt-000001" / "rng_rank0.pt"  # the RNG file too: it is loaded the same way
    state["extra"] = {}
    torch.save(state, state_path)
    torch.save({"python": Payload(marker)}, rng_path)
    line = cli_error(grpo, [*FAST, "--num_steps=2", f"--run_dir={run_dir}", f"--resume={run_dir}"], capsys, monkeypatch)
    assert "rng_rank0.pt: refused" in line
    assert not marker.exists()


def test_a_diverged_update_stops_the_run_and_is_never_saved(tmp_path, tiny_dir, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    # lr 1e3: the first update blows the weights up, the next step's loss and gradient norm are not finite
    monkeypatch.setattr(sys, "argv", ["grpo.py", *FAST, "--lr=1e3", "--warmup_steps=1", "--num_steps=4",
                                      "--save_every=1", f"--run_dir={run_dir}"])
    with pytest.raises(SystemExit) as exc:
        config.run(grpo.main)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # the lines before it are the progress bar's
    assert exc.value.code == 2 and "Traceback" not in err, err[-3000:]
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
    lm = loading.model(tiny_dir, torch.device("cpu"))
    (tmp_path / "run_id").write_text("r")
    with torch.no_grad():
        next(lm.parameters())[0, 0] = float("inf")
    cfg = grpo.Config(run_dir=str(tmp_path), lr=0.5)
    with pytest.raises(config.UserError, match=r"step 3: the weights are not finite.*--lr=0.5"):
        checkpoint.save(str(tmp_path), 3, lm, loading.tokenizer(tiny_dir),
                               torch.optim.AdamW(lm.parameters()), cfg, single_process())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run_id"]  # no ckpt dir, no `latest`


def _exploded(tiny_dir):
    """The tiny model after an update that left every weight finite but ~1e20 times too large (lr 1e30 does this)."""
    lm = loading.model(tiny_dir, torch.device("cpu"))
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(1e20)
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    return lm


def test_finite_but_exploded_weights_are_never_saved(tmp_path, tiny_dir):
    """Reliability item 3: finite weights whose logits overflow were saved as `latest`; the next rollout then died in
    multinomial with a traceback."""
    lm, tok = _exploded(tiny_dir), loading.tokenizer(tiny_dir)
    (tmp_path / "run_id").write_text("r")
    with pytest.raises(config.UserError, match=r"step 2: the weights give non-finite logits.*--lr=1e\+30"):
        checkpoint.save(str(tmp_path), 2, lm, tok, torch.optim.AdamW(lm.parameters()),
                        grpo.Config(run_dir=str(tmp_path), lr=1e30), single_process())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run_id"]


@pytest.mark.parametrize("fast", [False, True])
def test_a_rollout_from_exploded_weights_is_one_line_not_a_traceback(tiny_dir, fast):
    lm, tok = _exploded(tiny_dir), loading.tokenizer(tiny_dir)
    ids, mask = rollout.tokenize_prompts(tok, ["What is 2 + 3?"], torch.device("cpu"))
    with pytest.raises(config.UserError, match="next-token probabilities are not finite.*lower --lr"):
        rollout.generate(lm, tok, ids, mask, 2, 4, fast=fast)


def test_a_completion_past_the_context_is_refused_in_every_script(tiny_dir, tmp_path, capsys, monkeypatch):
    """Item 8: generation checks the longest prompt plus --max_new_tokens against the model's context (the trainers,
    eval and sample all generate through rollout.generate), one line instead of a traceback or silent wrong output."""
    limit = loading.model(tiny_dir, torch.device("cpu")).config.max_position_embeddings
    for module, argv in [(grpo, [*FAST, f"--run_dir={tmp_path / 'r'}"]),
                         (eval_gsm8k, ["--tiny", "--limit=4", f"--out_dir={tmp_path / 'e'}"])]:
        line = cli_error(module, [*argv, f"--max_new_tokens={limit}"], capsys, monkeypatch)
        assert f"passes the model's context of {limit} tokens" in line and "--max_new_tokens" in line, line


@pytest.mark.parametrize("argv,words", [
    (["--lr=1e38"], "--lr=1e+38 is too large for float32"), (["--rc_max=1e308"], "--rc_max=1e+308 is too large"),
    (["--lr=inf"], "--lr=inf is not finite"), (["--format_weight=nan"], "--format_weight=nan is not a number"),
    (["--seed=1000000000000000001"], "[0, 1e18]"), (["--num_steps=9223372036854775808"], "does not fit a 64-bit"),
    (["--dist_timeout=1e-9"], "[1, 1e7]"), (["--dist_timeout=1e300"], "[1, 1e7]")])
def test_numbers_the_code_cannot_carry_are_refused(argv, words):
    """Item 4: values the help called valid crashed (float overflow in AdamW, clamp and timedelta; int64)."""
    with pytest.raises(config.UserError, match=None) as e:
        config.parse(grpo.Config, ["--tiny", *argv], tiny=grpo.TINY)
    assert words in str(e.value), str(e.value)
    import gmpo
    with pytest.raises(config.UserError, match="--clip_eps=1e\\+308"):
        config.parse(gmpo.Config, ["--tiny", "--clip_eps=1e308"], tiny=gmpo.TINY)


def test_any_seed_the_help_allows_orders_prompts_and_small_seeds_keep_their_order():
    old = lambda seed: torch.randperm(50, generator=torch.Generator().manual_seed(seed * 100003)).tolist()[:8]
    assert loading.prompt_indices(50, 0, 8, 7) == old(7)  # runs made before the wrap are reproduced
    big = loading.prompt_indices(50, 3, 8, 10**18)  # seed * 100003 overflowed int64: a traceback before
    assert len(set(big)) == 8 and all(0 <= i < 50 for i in big)


# -----------------------------------------------------------------------------
# 4. signs and numbers: a dash before a number is a minus or makes it unreadable, never dropped


@pytest.mark.parametrize("completion", [
    "#### -\u00a03", "#### -\u200b3", "#### -\t3", "#### -  3", "#### -\u200e3", "#### \u20133", "#### \uff0d3",
    "#### \u20103", "#### \u2014 3", "#### -\u2066\u20663", "#### -$\u00a03",  # none may read as 3
    "#### 1_000", "#### 1'000", "#### 1\u2019000", "#### 3\u00bd", "#### 3\u20441"])  # none may read as 1 or 3
def test_an_unread_sign_or_joined_number_is_no_match(completion):
    ref = completion.split("####")[1].strip("- \u00a0\u200b\t\u200e\u2013\uff0d\u2010\u2014\u2066$")[:1]
    assert gsm8k.extract_answer(completion) is None
    assert gsm8k.correctness_reward(completion, ref) == 0.0 and gsm8k.format_reward(completion) == 0.0
    assert gsm8k.lenient_correct(completion, ref) == 0.0


def _every_char(*categories):
    return [chr(i) for i in range(0x20, 0x30000) if unicodedata.category(chr(i)) in categories]


def test_no_character_between_two_digits_cuts_the_number_short():
    """'#### 1?5' for every punctuation, symbol and mark character ?: the number is 1.5 ('.'), 1/5 ('/') or
    unreadable, never 1 or 5 (full-width and Arabic separators, the division slash, '^', primes, marks, ...); and the
    same with the character doubled ('2**10')."""
    wrong = []
    for c in _every_char("Po", "Pd", "Pc", "Ps", "Pe", "Pi", "Pf", "Sm", "Sc", "Sk", "So", "Mn", "Me", "Cf"):
        if c in "=<>()[]{}\u2248\u2260\u2264\u2265" or c in "#":
            continue  # separators: '(1)5' reads 5 by design ('3+1=4' reads 4); '#' starts a new answer line
        for text in (f"#### 1{c}5", f"#### 1{c}{c}5"):
            got = (gsm8k.extract_answer(text), gsm8k.extract_last_number(text))
            allowed = {".": (Fraction(3, 2), Fraction(3, 2)), "/": (Fraction(1, 5), Fraction(1, 5))}.get(text[6:-1])
            if got != (None, None) and got != allowed:
                wrong.append((text, got))
    assert not wrong, wrong[:20]


def test_a_minus_before_a_mark_or_invisible_character_is_never_dropped():
    """'-' then a combining or invisible character then 3: unreadable (the grammar reads no such sign), never +3."""
    wrong = [c for c in _every_char("Mn", "Me", "Cf") if gsm8k.extract_answer(f"#### -{c}3") is not None
             or gsm8k.extract_last_number(f"x -{c}3") is not None]
    assert not wrong, [hex(ord(c)) for c in wrong[:20]]


def test_minus_signs_the_grammar_reads_still_count():
    for text in ("#### -3", "#### \u22123", "#### - 3", "#### -$3"):
        assert gsm8k.extract_answer(text) == -3 and gsm8k.correctness_reward(text, "-3") == 1.0
    assert gsm8k.extract_last_number("so the answer is 3-2=1") == 1  # an equation's minus is not the answer's


def test_latex_fractions_are_not_read_as_one_of_their_parts():
    # decided: lenient mode does not parse LaTeX; \frac{3}{4} is unreadable, never 3 or 4 (docs/eval.md)
    assert gsm8k.extract_last_number("\\boxed{\\frac{3}{4}}") is None
    assert gsm8k.lenient_correct("\\boxed{\\frac{3}{4}}", "4") == 0.0
    assert gsm8k.lenient_correct("\\boxed{\\frac{3}{4}}", "0.75") == 0.0
    assert gsm8k.lenient_correct("so \\boxed{18}", "18") == 1.0


# -----------------------------------------------------------------------------
# 3. a run dir is this project's run dir, nothing else; a resumed run reads as one run


def test_a_model_dir_or_a_foreign_dir_is_never_a_run_dir(tmp_path, tiny_dir, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for extra in ([], ["--overwrite"]):  # the model's files stay untouched
        line = cli_error(grpo, [*FAST, "--num_steps=1", f"--run_dir={model}", *extra], capsys, monkeypatch)
        assert all(w in line for w in ("holds files no run of this project writes", "model.safetensors",
                                       "nothing there was changed")), line
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    other = tmp_path / "other"  # run files with no run_id: not ours; --overwrite deleted them anywhere, `/` too
    (other / "ckpt-000001").mkdir(parents=True)
    (other / "latest").write_text("ckpt-000001")
    (other / "metrics.jsonl").write_text("")
    line = cli_error(grpo, [*FAST, "--num_steps=1", f"--run_dir={other}", "--overwrite"], capsys, monkeypatch)
    assert "has no run_id file" in line
    assert sorted(p.name for p in other.iterdir()) == ["ckpt-000001", "latest", "metrics.jsonl"]


@pytest.mark.parametrize("named", ["/etc", "../elsewhere/ckpt-000001", "ckpt-000001/../..", ""])
def test_latest_is_never_followed_out_of_the_run_dir(tmp_path, named):
    (tmp_path / "latest").write_text(named)
    with pytest.raises(config.UserError, match="not one of this run dir's ckpt-\\* dirs"):
        checkpoint.resolve_latest(str(tmp_path))


def test_a_resumed_run_reads_as_one_run_and_another_trainer_cannot_resume_it(tmp_path, tiny_dir, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_main(grpo, [*FAST, "--num_steps=3", "--save_every=2", f"--run_dir={run_dir}"], monkeypatch)
    # as if killed after logging step 3, before saving it: `latest` names ckpt-000002
    shutil.rmtree(run_dir / "ckpt-000003")
    (run_dir / "latest").write_text("ckpt-000002")
    (run_dir / "latest.tmp").write_text("ckpt-000003")  # what a crash between two renames leaves
    # dapo.py must not resume grpo.py's checkpoint
    line = cli_error(trainers.load("dapo"), [*FAST, "--num_steps=4", f"--run_dir={run_dir}", f"--resume={run_dir}"],
                     capsys, monkeypatch)
    assert "was written by grpo.py, not dapo.py" in line
    # a run_config.json without its trainer's name is refused by every trainer, never taken for its own
    rc = run_dir / "ckpt-000002" / "run_config.json"
    saved = rc.read_text()
    rc.write_text(json.dumps({k: v for k, v in json.loads(saved).items() if k != "trainer"}))
    for module in (trainers.load("dapo"), grpo):
        line = cli_error(module, [*FAST, "--num_steps=4", f"--run_dir={run_dir}", f"--resume={run_dir}"], capsys,
                         monkeypatch)
        assert "run_config.json names no trainer" in line, line
    rc.write_text(saved)
    run_main(grpo, [*FAST, "--num_steps=4", "--save_every=2", f"--run_dir={run_dir}", f"--resume={run_dir}"],
             monkeypatch)
    steps = [json.loads(x)["step"] for x in open(run_dir / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4], steps  # step 3 once, though it was logged, not saved, and run again
    assert not (run_dir / "latest.tmp").exists()
    assert json.load(open(run_dir / "ckpt-000004" / "run_config.json"))["trainer"] == "grpo"


# -----------------------------------------------------------------------------
# 5. every entry point speaks one line (exit 2) for a bad value, before anything loads


@pytest.mark.parametrize("script,argv,words", [
    ("sample", ["--top_p=-1"], "--top_p=-1.0 is out of range"), ("sample", ["--top_p=0"], "(0, 1]"),
    ("sample", ["--temperature=nan"], "--temperature=nan"), ("sample", ["--max_new_tokens=0"], "[1, inf)"),
    ("sample", ["--max_new_tokens=-1"], "--max_new_tokens=-1"), ("sample", ["--batch_size=0"], "--batch_size=0"),
    ("sample", ["--format_weight=nan"], "--format_weight=nan"),
    ("eval_gsm8k", ["--temperature=nan"], "--temperature=nan"), ("eval_gsm8k", ["--temperature=inf"], "[0, inf)"),
    ("eval_gsm8k", ["--temperature=-1"], "--temperature=-1.0"), ("eval_gsm8k", ["--split=bogus"], "{test, train}")])
def test_sample_and_eval_refuse_bad_values_in_one_line(script, argv, words, capsys, monkeypatch):

    line = cli_error(importlib.import_module(script), ["--tiny", *argv], capsys, monkeypatch)  # refused, not accepted
    assert words in line, line


@pytest.mark.parametrize("argv,words", [
    (["--num_seqs=0"], "--num_seqs=0"), (["--group_size=0"], "--group_size=0"), (["--num_minibatches=0"], "[1, inf)"),
    (["--prompt_len=0"], "--prompt_len=0"), (["--max_new_tokens=0"], "--max_new_tokens=0"),
    (["--micro_batch_size=0"], "--micro_batch_size"), (["--logprob_chunk=0"], "--logprob_chunk=0"),
    (["--repeats=0"], "--repeats=0"), (["--threads=-1"], "--threads=-1"), (["--temperature=0"], "(0, inf)"),
    (["--device=tpu"], "{auto, cpu, cuda}"), (["--beta=nan"], "--beta=nan"), (["--top_p=0"], "(0, 1]")])
def test_bench_refuses_bad_values_in_one_line(argv, words, capsys, monkeypatch):
    assert words in cli_error(bench, ["--tiny", *argv], capsys, monkeypatch)  # one line, no traceback


def test_damaged_checkpoint_contents_are_one_line_errors(tmp_path, tiny_dir, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_main(grpo, [*FAST, "--num_steps=1", f"--run_dir={run_dir}"], monkeypatch)
    ckpt = run_dir / "ckpt-000001"
    opt = torch.optim.AdamW(loading.model(tiny_dir, torch.device("cpu")).parameters())
    good = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    for change, words in [(lambda s: s.pop("world_size"), "world_size missing"),  # named, no KeyError
                          (lambda s: s.update(step="2"), "step missing or of the wrong type"),
                          (lambda s: s.update(optimizer={"state": {}, "param_groups": [{}]}), "does not fit this run")]:
        state = dict(good)
        change(state)
        torch.save(state, ckpt / "trainer_state.pt")
        with pytest.raises(config.UserError, match=words):
            checkpoint.restore(str(ckpt), opt, single_process())
    torch.save(good, ckpt / "trainer_state.pt")
    cfg = grpo.Config(resume=str(ckpt), run_dir=str(tmp_path / "new"), num_steps=5)
    saved = (ckpt / "run_config.json").read_text()
    for text in ['{"config": {}, "run_id": "r", "step": "2"}', "{}", '{"config": [1], "run_id": "r", "step": 1}', "[1]"]:
        (ckpt / "run_config.json").write_text(text)  # one line, no traceback
        with pytest.raises(config.UserError, match="run_config.json: damaged or not written by this project"):
            checkpoint.start_run(cfg, single_process())
    (ckpt / "run_config.json").write_text(saved)


def test_sample_prompt_files_that_would_crash_later_are_refused_first(tmp_path):
    binary = tmp_path / "q.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01 what")  # one line, no UnicodeDecodeError
    with pytest.raises(config.UserError, match="not UTF-8 text"):
        sample.read_prompt_file(str(binary))
    binary.write_bytes(b"What is 2+2?\x00\x00\n")
    with pytest.raises(config.UserError, match="NUL bytes"):
        sample.read_prompt_file(str(binary))
    jl = tmp_path / "q.jsonl"
    for answer in ['"two"', "true", '"####"', "[1]"]:  # refused before generating anything
        jl.write_text('{"question": "a", "answer": 2}\n{"question": "b", "answer": %s}\n' % answer)
        with pytest.raises(config.UserError, match=r"q.jsonl:2: 'answer' .* is not a number"):
            sample.read_prompt_file(str(jl))
    jl.write_text('{"question": "a", "answer": 2}\n{"question": "b", "answer": "3"}\n{"question": "c"}\n')
    assert [r["answer"] for r in sample.read_prompt_file(str(jl))] == ["#### 2", "#### 3", None]


def test_eval_checks_its_out_dir_before_evaluating(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")  # refused before the evaluation runs
    line = cli_error(eval_gsm8k, ["--tiny", f"--out_dir={tmp_path / 'a_file' / 'out'}"], capsys, monkeypatch)
    assert "is not a writable folder" in line and "Not a directory" in line
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_id").write_text("r")
    for where in (loading.model_path("tiny", single_process()), run):  # never written into a model or a run
        line = cli_error(eval_gsm8k, ["--tiny", f"--out_dir={where}"], capsys, monkeypatch)
        assert "holds a model or a run" in line, line
    assert sorted(os.listdir(run)) == ["run_id"]


@pytest.mark.parametrize("module,argv,words", [
    ("grpo", ["--seed=18446744073709551616"], "--seed=18446744073709551616 does not fit a 64-bit"),  # one line, no traceback
    ("grpo", ["--seed=-1"], "[0, 1e18]"), ("sample", ["--seed=1e30"], "expects an integer"),
    ("gtpo", ["--ent_initial=nan"], "--ent_initial=nan is not a number")])  # refused, not accepted
def test_seeds_and_gtpo_entropy_are_checked(module, argv, words, capsys, monkeypatch):

    assert words in cli_error(importlib.import_module(module), ["--tiny", *argv], capsys, monkeypatch)


# 5. a full disk or a read-only run dir during a save: one line naming the path, `latest` intact, no partial copy


@pytest.mark.parametrize("where,error,says", [
    ("makedirs", lambda p: OSError(errno.EROFS, os.strerror(errno.EROFS), p), os.strerror(errno.EROFS)),
    ("torch.save", lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p), os.strerror(errno.ENOSPC)),
    # what torch's and safetensors' own writers raise on a full disk (seen on a 1 MB and a 2 MB tmpfs)
    ("torch.save", lambda p: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 644800 vs "
                                          "644688"), "a write failed ([enforce fail at inline_container.cc:672]"),
    ("safe_save_file", lambda p: SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                                 "error 28)"), "No space left on device (os error 28)")])
def test_a_save_that_cannot_write_stops_in_one_line_and_keeps_latest(where, error, says, tmp_path, tiny_dir, capsys,
                                                                        monkeypatch):
    import transformers.modeling_utils
    run_dir, saves = tmp_path / "run", []
    owner = {"makedirs": checkpoint.os, "torch.save": checkpoint.torch,
             "safe_save_file": transformers.modeling_utils}[where]
    real = getattr(owner, where.split(".")[-1])

    def failing(*args, **kwargs):  # the second checkpoint's first write of this kind fails
        saves.append(next(str(a) for a in args if isinstance(a, (str, os.PathLike))))
        if "ckpt-000002" in saves[-1]:
            raise error(saves[-1])
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, where.split(".")[-1], failing)
    monkeypatch.setattr(sys, "argv", ["grpo.py", *FAST, "--num_steps=2", "--save_every=1", f"--run_dir={run_dir}"])
    with pytest.raises(SystemExit) as exc:
        config.run(grpo.main)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # the lines before it are the progress bar's
    assert exc.value.code == 2 and "Traceback" not in err and line.startswith("grpo.py: error: "), err[-3000:]
    assert "step 2: cannot write the checkpoint: " in line and "ckpt-000002" in line, line
    assert says in line and "--resume" in line, line
    assert open(run_dir / "latest").read() == "ckpt-000001"
    assert sorted(x for x in os.listdir(run_dir) if x.startswith("ckpt")) == ["ckpt-000001"]
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_a_prompt_past_the_context_length_is_refused_before_generating(tmp_path, tiny_dir, capsys, monkeypatch):
    prompts = tmp_path / "q.txt"
    prompts.write_text("What is 2+2?\n" + "what is 3+3? " * 240_000 + "\n")  # a 3 MB line (checked before generating)
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: pytest.fail("generated before checking the prompts"))
    line = cli_error(sample, ["--tiny", f"--prompt_file={prompts}", "--max_new_tokens=32"], capsys, monkeypatch)
    assert "prompt 2 is " in line and "context of 512 tokens" in line and "--max_new_tokens=32" in line, line
    prompts.write_text("What is 2+2?\n" + "x" * 470 + "\n")  # fits alone, not with 64 new tokens
    line = cli_error(sample, ["--tiny", f"--prompt_file={prompts}", "--max_new_tokens=64"], capsys, monkeypatch)
    assert "prompt 2 is " in line, line


def test_a_run_never_writes_through_a_link_in_its_run_dir(tmp_path, tiny_dir, capsys, monkeypatch):
    """A link among the run files (metrics.jsonl, config.json, run_id, latest, a ckpt dir) would be written through
    or, with --overwrite, followed: refused in one line before anything is written, the link's target untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("metrics.jsonl", "config.json", "latest", "ckpt-000001"):
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / "run_id").write_text("x")
        (run / name).symlink_to(victim)
        for extra in ([], ["--overwrite"]):
            line = cli_error(grpo, [*FAST, "--num_steps=1", f"--run_dir={run}", *extra], capsys, monkeypatch)
            assert f"holds links ({name})" in line and "nothing there was changed" in line, line
        assert victim.read_text() == "keep me" and sorted(os.listdir(run)) == sorted(["run_id", name])


def test_a_log_that_cannot_be_appended_stops_the_run_in_one_line(tmp_path):
    """A disk that fills up or turns read-only mid-run: the metrics append is one line naming the file and --resume."""
    logger = logs.Logger(str(tmp_path), grpo.Config(run_dir=str(tmp_path)), True)
    logger.log(1, {"reward": 0.5})
    logger.path = str(tmp_path / "gone" / "metrics.jsonl")  # any OSError of the append: here, no such dir
    with pytest.raises(config.UserError, match=r"step 2: cannot append to .*metrics.jsonl: No such file or directory; "
                                               r"free disk space or make it writable, then --resume from "):
        logger.log(2, {"reward": 0.5})
