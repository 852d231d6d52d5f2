"""The shared evaluator (evaluation.evaluate and its helpers), eval_gsm8k.py and sample.py."""
import itertools
import json
import random
from fractions import Fraction

import pytest
import torch

from grpo_family import config, distributed, evaluation, gsm8k, loading, logs, tiny
from helpers import run, run_main, single_process, torchrun

import eval_gsm8k  # noqa: E402  (importable: the script bodies run only under __main__)
import sample  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}  # one thread per process: faster on a small shared CPU, same results


# -----------------------------------------------------------------------------
# pure helpers: pass@k, majority vote, Wilson interval, per-problem records


def test_pass_at_k_hand_values():
    # n=5 samples, c=2 correct: 1 - C(3,k)/C(5,k)
    assert evaluation.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert evaluation.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)   # C(3,2)=3, C(5,2)=10
    assert evaluation.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)   # C(3,3)=1, C(5,3)=10
    assert evaluation.pass_at_k(5, 2, 4) == 1.0                           # k > n-c: every k-subset has a hit
    assert evaluation.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert evaluation.pass_at_k(8, 0, 8) == 0.0 and evaluation.pass_at_k(8, 8, 1) == 1.0
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (4, -1, 1)]:
        with pytest.raises(ValueError):
            evaluation.pass_at_k(*bad)


def test_pass_at_k_matches_subset_enumeration():
    """pass@k is the fraction of k-subsets of the n samples that contain a correct one."""
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 9)
        c, k = rng.randint(0, n), rng.randint(1, n)
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        hits = sum(1 for s in subsets if any(samples[i] for i in s))
        assert evaluation.pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), abs=1e-12), (n, c, k)


def test_majority_vote_ties_go_to_first_occurrence():
    assert evaluation.majority_vote([3, 5, 5, 3]) == 3      # 2 votes each: 3 occurs first
    assert evaluation.majority_vote([5, 3, 3, 5]) == 5
    assert evaluation.majority_vote([1, 2, 2]) == 2          # a strict majority wins wherever it starts
    assert evaluation.majority_vote([None, None, 7]) == 7    # completions without an answer do not vote
    assert evaluation.majority_vote([None, 4, None, 9]) == 4
    assert evaluation.majority_vote([None, None]) is None
    assert evaluation.majority_vote([]) is None
    # answers are compared as numbers: '1/2' and '0.5' are one answer with two votes
    answers = [gsm8k.extract_answer(t) for t in ["#### 3", "#### 1/2", "#### 0.5"]]
    assert evaluation.majority_vote(answers) == Fraction(1, 2)


def test_wilson_interval_hand_values():
    lo, hi = evaluation.wilson_interval(0.5, 100)
    assert (lo, hi) == (pytest.approx(0.403832, abs=1e-5), pytest.approx(0.596168, abs=1e-5))
    lo, hi = evaluation.wilson_interval(0.0, 10)  # z²/n / (1 + z²/n) = 0.38416 / 1.38416
    assert lo == 0.0 and hi == pytest.approx(0.38416 / 1.38416, abs=1e-9)
    lo, hi = evaluation.wilson_interval(1.0, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.38416 / 1.38416, abs=1e-9)
    assert evaluation.wilson_interval(0.3, 0) == (0.0, 1.0)
    for p, n in [(0.1, 7), (0.73, 1319), (0.285, 200)]:  # contains p, narrows with more problems
        lo, hi = evaluation.wilson_interval(p, n)
        lo4, hi4 = evaluation.wilson_interval(p, 4 * n)
        assert lo < p < hi and lo < lo4 and hi4 < hi


def test_summarize_eval_hand_records():
    a = evaluation.score_problem(0, {"question": "qa", "answer": "1+6=7\n#### 7"},
                             ["1+6=7\n#### 7", "7\n#### 8", "The answer is 7.", "#### 7"], [False] * 4)
    assert a["extracted"] == ["7", "8", None, "7"] and a["last_number"] == ["7", "8", "7", "7"]
    assert a["correct"] == [True, False, False, True] and a["lenient"] == [True, False, True, True]
    assert a["format"] == [True, True, False, True]
    assert a["majority"] == "7" and a["majority_correct"] and a["majority_lenient_correct"]
    b = evaluation.score_problem(1, {"question": "qb", "answer": "#### 3"},
                             ["#### 4", "#### 5", "#### 5", "#### 4 apples"], [False, False, False, True])
    assert b["majority"] == "4" and not b["majority_correct"]  # 4 and 5 tie: 4 occurs first
    assert b["format"] == [True, True, True, False] and b["truncated"] == [False, False, False, True]

    m = evaluation.summarize_eval([a, b], ks=[1, 2, 4])
    assert m["n"] == 2 and m["samples"] == 4
    assert m["strict"] == pytest.approx((2 / 4 + 0) / 2)
    assert m["lenient"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["format"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert m["truncated"] == pytest.approx((0 + 1 / 4) / 2)
    assert m["pass@1"] == pytest.approx(m["strict"])
    assert m["pass@2"] == pytest.approx((1 - 1 / 6) / 2)   # problem a: 1 - C(2,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["maj"] == 0.5 and m["maj_lenient"] == 0.5
    assert (m["strict_lo"], m["strict_hi"]) == evaluation.wilson_interval(m["strict"], 2)
    assert evaluation.default_ks(4) == [1, 2, 4] and evaluation.default_ks(6) == [1, 2, 4, 6]
    assert evaluation.default_ks(1) == [1]


# -----------------------------------------------------------------------------
# evaluation.evaluate on the tiny model, in process


@pytest.fixture(scope="module")
def tiny_setup(tiny_dir):
    return loading.model(tiny_dir, torch.device("cpu")), loading.tokenizer(tiny_dir)


def test_evaluate_trainer_contract_and_rng(tiny_setup):
    """The trainers' call: greedy, scalar metrics they log; their RNG stream is left as it was."""
    model, tok = tiny_setup
    model.train()
    problems = tiny.dataset("test")[:6]
    state = torch.get_rng_state()
    ev = evaluation.evaluate(model, tok, problems, single_process(), 32, system_prompt="")
    assert model.training, "evaluate must restore train mode"
    assert torch.equal(state, torch.get_rng_state())
    assert ev["n"] == 6 and ev["samples"] == 1
    assert all(isinstance(v, (int, float)) for v in ev.values()), "trainers log every value as a scalar"
    json.dumps(ev)
    assert 0 <= ev["strict"] <= ev["lenient"] <= 1 and ev["strict_lo"] <= ev["strict"] <= ev["strict_hi"]
    # sampling with a seed does not touch the global RNG either, and gives the same samples twice
    kw = dict(system_prompt="", n=3, temperature=1.0, seed=5, return_predictions=True)
    _, r1 = evaluation.evaluate(model, tok, problems, single_process(), 32, **kw)
    _, r2 = evaluation.evaluate(model, tok, problems, single_process(), 32, **kw)
    assert torch.equal(state, torch.get_rng_state()) and r1 == r2
    with pytest.raises(ValueError, match="temperature"):
        evaluation.evaluate(model, tok, problems, single_process(), 32, n=3)
    with pytest.raises(ValueError, match="no problems"):
        evaluation.evaluate(model, tok, [], single_process(), 32)


def test_evaluate_shards_do_not_depend_on_world_size(tiny_setup):
    """Each rank's share (batches j = rank, rank + W, ...) merges into exactly the 1-rank records."""
    model, tok = tiny_setup
    problems = tiny.dataset("test")[:10]
    kw = dict(batch_size=6, system_prompt="", n=3, temperature=1.0, top_p=0.95, return_predictions=True)
    _, full = evaluation.evaluate(model, tok, problems, single_process(), 24, **kw)
    parts = []
    for rank in range(3):  # three ranks of a 3-rank run, each evaluated without a process group
        d = distributed.Dist(False, rank, rank, 3, torch.device("cpu"), rank == 0)
        parts += evaluation.evaluate(model, tok, problems, d, 24, **kw)[1]
    assert sorted(parts, key=lambda r: r["index"]) == full
    assert [r["index"] for r in full] == list(range(10))
    assert [r["question"] for r in full] == [p["question"] for p in problems]
    assert all(len(r["completions"]) == 3 for r in full)


def test_evaluate_fast_rollout_gives_the_same_greedy_records(tiny_setup):
    """fast=True (static-KV-cache decode loop) must not change what the evaluator reports."""
    model, tok = tiny_setup
    problems = tiny.dataset("test")[:12]
    kw = dict(batch_size=8, system_prompt="", return_predictions=True)
    slow = evaluation.evaluate(model, tok, problems, single_process(), 32, **kw)
    fast = evaluation.evaluate(model, tok, problems, single_process(), 32, fast=True, **kw)
    assert fast == slow


# -----------------------------------------------------------------------------
# eval_gsm8k.py: 1 process and 2 gloo processes give identical results


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


def test_eval_script_one_vs_two_processes(tmp_path, capsys, monkeypatch):
    """eval_gsm8k.py in this process, then on two gloo ranks (processes of their own: two ranks): the same records."""
    rows = tiny.dataset("test")[:10]
    data = write_jsonl(tmp_path / "test.jsonl", rows)  # GSM8K format: question, answer with '#### n'
    args = ["--tiny", f"--data_path={data}", "--limit=9", "--batch_size=4"]
    run_main(eval_gsm8k, [*args, f"--out_dir={tmp_path / 'one'}"], monkeypatch)
    out1 = capsys.readouterr().out
    run(torchrun(2, "eval_gsm8k.py", *args, f"--out_dir={tmp_path / 'two'}"), env=ENV)
    assert "strict" in out1 and "95% CI" in out1 and "Wilson" in out1

    p1, p2 = tmp_path / "one" / "predictions.jsonl", tmp_path / "two" / "predictions.jsonl"
    assert p1.read_text() == p2.read_text(), "predictions differ between 1 and 2 processes"
    s1, s2 = (json.load(open(tmp_path / x / "summary.json")) for x in ("one", "two"))
    assert s1["metrics"] == s2["metrics"] and (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["versions"] == logs.versions() and out1.count("versions: ") == 1  # for problem reports

    preds = read_jsonl(p1)
    assert len(preds) == 9 == s1["problems"]  # one line per problem, the first --limit of them, in order
    assert [p["question"] for p in preds] == [r["question"] for r in rows[:9]]
    # the summary is what the predictions say, recounted here with plain loops
    strict = lenient = fmt = 0
    for p in preds:
        assert len(p["completions"]) == 1 and p["reference"] == str(gsm8k.extract_answer(rows[p["index"]]["answer"]))
        strict += p["correct"][0]
        lenient += p["lenient"][0]
        fmt += p["format"][0]
        if p["format"][0] and p["correct"][0]:  # a completion ending in '#### x' has last number x
            assert p["lenient"][0]
    m = s1["metrics"]
    assert (m["strict"], m["lenient"], m["format"]) == (strict / 9, lenient / 9, fmt / 9)
    assert m["strict"] <= m["lenient"]
    assert (m["strict_lo"], m["strict_hi"]) == tuple(evaluation.wilson_interval(strict / 9, 9))


# -----------------------------------------------------------------------------
# sample.py on a saved checkpoint, and the prompt sources


def test_sample_on_saved_checkpoint(tmp_path, tiny_setup, capsys, monkeypatch):
    model, tok = tiny_setup
    ckpt = tmp_path / "run" / "ckpt-000001"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (tmp_path / "run" / "latest").write_text("ckpt-000001")
    run_main(sample, ["--tiny", f"--model={tmp_path / 'run'}", "--num_questions=2", "--num_samples=2",
                      "--temperature=1.0"], monkeypatch)
    out = capsys.readouterr().out
    assert f"model: {ckpt}" in out  # the run dir resolved to its latest checkpoint
    assert out.splitlines()[0] == "versions: " + json.dumps(logs.versions())
    assert "=== prompt 1/2 (reference answer" in out and "=== prompt 2/2" in out
    lines = [l for l in out.splitlines() if l.startswith("--- completion")]
    assert len(lines) == 4 and all("answer" in l and "| reward " in l for l in lines)


def test_sample_prompt_sources_and_reward_line(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("What is 2+2?\n\n  Tom has 3 apples.  \n")
    assert sample.read_prompt_file(str(txt)) == [{"question": "What is 2+2?", "answer": None},
                                                 {"question": "Tom has 3 apples.", "answer": None}]
    jl = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "1+1=2\n#### 2"},
                                            {"question": "b", "answer": 5}, {"question": "c"}])
    assert [r["answer"] for r in sample.read_prompt_file(jl)] == ["1+1=2\n#### 2", "#### 5", None]
    assert sample.describe("3+4=7\n#### 7", "#### 7", 0.1) == \
        "answer 7 | format 1 | strict 1 | lenient 1 | reward 1.10"
    assert sample.describe("3+4=7\nThe answer is 7.", "#### 7", 0.1) == \
        "answer (none) | format 0 | strict 0 | lenient 1 | reward 0.00"
    assert sample.describe("#### 9", None, 0.1) == "answer 9 | format 1 | reward n/a (no reference answer)"


# -----------------------------------------------------------------------------
# clear errors


def test_clear_errors(tmp_path):
    missing = str(tmp_path / "no-such-run" / "ckpt-000001")
    with pytest.raises(config.UserError, match=r"--limit=0 evaluates no problems"):
        eval_gsm8k.main(["--tiny", "--limit=0"])
    with pytest.raises(config.UserError, match="does not exist"):
        eval_gsm8k.main([f"--model={missing}", "--limit=1"])
    with pytest.raises(config.UserError, match="does not exist"):
        sample.main([f"--model={missing}", "--prompt=hi"])
    with pytest.raises(config.UserError, match="temperature"):
        eval_gsm8k.main(["--tiny", "--num_samples=4"])
    with pytest.raises(config.UserError, match="every k"):
        eval_gsm8k.main(["--tiny", "--num_samples=4", "--temperature=1", "--ks=1,8"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(config.UserError, match="has no prompts"):
        sample.main(["--tiny", f"--prompt_file={empty}"])
    with pytest.raises(config.UserError, match="prompt file"):
        sample.main(["--tiny", f"--prompt_file={tmp_path / 'nope.txt'}"])
    with pytest.raises(config.UserError, match="num_questions=0"):
        sample.main(["--tiny", "--num_questions=0"])
    # model paths: relative paths that do not exist, a dir that holds no model, a run dir with `latest`
    with pytest.raises(config.UserError, match="does not exist"):
        loading.model_path("runs/no-such-run/ckpt-000001", single_process())
    with pytest.raises(config.UserError, match="no config.json"):
        loading.model_path(str(tmp_path), single_process())
    run_dir = tmp_path / "run"
    (run_dir / "ckpt-000002").mkdir(parents=True)
    (run_dir / "ckpt-000002" / "config.json").write_text("{}")
    (run_dir / "latest").write_text("ckpt-000002\n")
    assert loading.model_path(str(run_dir), single_process()) == str(run_dir / "ckpt-000002")
    (run_dir / "latest").write_text("ckpt-000009")
    with pytest.raises(config.UserError, match="ckpt-000009"):
        loading.model_path(str(run_dir), single_process())
    assert loading.model_path("Qwen/Qwen2.5-1.5B-Instruct", single_process()) == "Qwen/Qwen2.5-1.5B-Instruct"
