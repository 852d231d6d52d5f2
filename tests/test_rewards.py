"""GSM8K answer extraction and rewards: every reference solution scores 1, shuffled answers 0."""
import json
import os
import random
import re
from fractions import Fraction

import pytest
import torch

from grpo_family import gsm8k, rollout, tiny
from helpers import SHARED_GSM8K


def shared_rows(split):
    path = os.path.join(SHARED_GSM8K, f"{split}.jsonl")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present (set GSM8K_DIR to a directory holding it)")
    return [json.loads(l) for l in open(path)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_solution_scores_one(split):
    rows = shared_rows(split)
    assert len(rows) > 1000
    bad = [r["answer"][-60:] for r in rows if gsm8k.correctness_reward(r["answer"], r["answer"]) != 1.0
           or gsm8k.format_reward(r["answer"]) != 1.0]
    assert not bad, f"{len(bad)} reference solutions not recognised, e.g. {bad[:3]}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_shuffled_answers_score_zero(split):
    rows = shared_rows(split)
    rng = random.Random(0)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pairs = [(rows[i]["answer"], rows[j]["answer"]) for i, j in zip(range(len(rows)), order)
             if gsm8k.extract_answer(rows[i]["answer"]) != gsm8k.extract_answer(rows[j]["answer"])]
    assert len(pairs) > 0.9 * len(rows)
    assert all(gsm8k.correctness_reward(c, a) == 0.0 for c, a in pairs)


@pytest.mark.parametrize("text,value", [
    ("#### 72", Fraction(72)),
    ("so #### 1,234", Fraction(1234)),
    ("#### $1,234.50", Fraction(246900, 200)),
    ("#### -5", Fraction(-5)),
    ("#### 3/4", Fraction(3, 4)),
    ("#### 0.75", Fraction(3, 4)),
    ("#### .5", Fraction(1, 2)),
    ("#### 18 apples", Fraction(18)),
    ("#### $ 7", Fraction(7)),
    ("first #### 3 then #### 4", Fraction(4)),
    ("The answer is 12.", None),
    ("#### none", None),
    ("#### 1/0", None),
])
def test_extract_answer(text, value):
    assert gsm8k.extract_answer(text) == value


def test_tricky_completions():
    ref = "Some steps <<2*3=6>>6\n#### 1,000"
    assert gsm8k.correctness_reward("... so the total is\n#### 1000", ref) == 1.0
    assert gsm8k.correctness_reward("#### 1000.00", ref) == 1.0
    assert gsm8k.correctness_reward("#### $1,000", ref) == 1.0
    assert gsm8k.correctness_reward("#### 100", ref) == 0.0
    assert gsm8k.correctness_reward("The answer is 1000", ref) == 0.0  # strict: needs '####'
    assert gsm8k.lenient_correct("The answer is 1000", ref) == 1.0     # lenient: last number
    assert gsm8k.lenient_correct("1000 or maybe 999", ref) == 0.0
    assert gsm8k.correctness_reward("#### 3/4", "#### 0.75") == 1.0
    assert gsm8k.correctness_reward("#### -3", "#### 3") == 0.0
    assert gsm8k.correctness_reward("#### 2.5", "#### 5/2") == 1.0


def test_format_reward():
    assert gsm8k.format_reward("2+2=4\n#### 4") == 1.0
    assert gsm8k.format_reward("2+2=4\n#### 4\n") == 1.0
    assert gsm8k.format_reward("2+2=4\n#### -4.5") == 1.0
    assert gsm8k.format_reward("#### 4 apples") == 0.0
    assert gsm8k.format_reward("#### 4\nand more text") == 0.0
    assert gsm8k.format_reward("The answer is 4.") == 0.0
    assert gsm8k.format_reward("") == 0.0


def test_rewards_compose():
    fns = [(1.0, gsm8k.correctness_reward), (0.5, gsm8k.format_reward)]
    r = rollout.rewards(["#### 4", "The answer is 4", "#### 5"], ["#### 4"] * 3, fns)
    assert torch.allclose(r, torch.tensor([1.5, 0.0, 0.5]))


def test_tiny_task_answers_are_gsm8k_format():
    for split in ["train", "test"]:
        rows = tiny.dataset(split)
        assert all(gsm8k.correctness_reward(r["answer"], r["answer"]) == 1.0 for r in rows)
    train_q = {r["question"] for r in tiny.dataset("train")}
    assert not train_q & {r["question"] for r in tiny.dataset("test")}


@pytest.mark.parametrize("completion,value", [
    ("#### 1\uff0c 500", 1500), ("#### 1, 500", 1500), ("#### 1\u200d,500", 1500), ("#### 3/  4", Fraction(3, 4)),
    ("#### 3 \uff0c1/2", Fraction(7, 2)), ("#### 1\u00bd/2", Fraction(3, 4)), ("#### 3 + 4", 7),
    ("#### $1,500.\u200d25", Fraction(6001, 4)),                       # glue and blanks inside: never a cut piece
    ("#### -\uff0c12", -12), ("#### \u2013*12", -12), ("#### -\n,1500", -1500),  # a minus past glue: never +
    ("#### .\u200d5", Fraction(1, 2))])                                  # a point past a mark: never 5
def test_a_number_with_glue_and_blanks_inside_is_never_read_in_part(completion, value):
    """Found by tests/test_fuzz.py: each of these read as a cut piece or with its sign dropped ('1' or '500' of
    '1, 500', 12 of '-\uff0c12', 5 of '.\u200d5'); the intended number or none, and no reward for a piece."""
    assert gsm8k.extract_answer(completion) in (None, value) and gsm8k.extract_last_number(completion) in (None, value)
    for piece in {int(p) for p in re.findall(r"[0-9]+", completion)} - {value}:
        assert gsm8k.correctness_reward(completion, f"#### {piece}") == 0.0
        assert gsm8k.lenient_correct(completion, str(piece)) == 0.0


@pytest.mark.parametrize("completion,strict,lenient", [
    ("x = 7 #### 18", 18, 18), ("---\n#### 18", 18, 18), ("#### **18**", 18, 18), ("4+9=13\n### 13", None, 13),
    ("It has 120 members. 40% are adults", None, 40), ("#### 18.\nThen 5 more", 18, 5), ("Total. 5", None, 5)])
def test_markers_sentences_and_markdown_still_part_numbers(completion, strict, lenient):
    assert gsm8k.extract_answer(completion) == strict and gsm8k.extract_last_number(completion) == lenient
