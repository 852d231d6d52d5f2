"""The hub loading code path (from_pretrained, load_dataset) on local files, and its errors."""
import json

import pytest
import torch

from grpo_family import config, gsm8k, loading, tiny


def test_from_pretrained_roundtrip(tiny_dir, tmp_path):
    tok = loading.tokenizer(tiny_dir)
    lm = loading.model(tiny_dir, torch.device("cpu"))
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = loading.tokenizer(str(tmp_path))
    lm2 = loading.model(str(tmp_path), torch.device("cpu"), torch.bfloat16)
    assert next(lm2.parameters()).dtype == torch.bfloat16
    text = gsm8k.build_prompt(tok, "Ann has 3 pens.", "")
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"]) == text  # char-level: newlines survive the round trip
    for a, b in zip(lm.parameters(), lm2.parameters()):
        assert torch.allclose(a.to(torch.bfloat16), b)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(config.UserError, match="does not exist"):
        loading.model(str(tmp_path / "nope"), torch.device("cpu"))
    with pytest.raises(config.UserError, match="does not exist"):
        loading.tokenizer(str(tmp_path / "nope"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_load_dataset_from_local_jsonl(tmp_path):
    rows = tiny.dataset("test")[:5]
    write_jsonl(tmp_path / "test.jsonl", rows)
    assert gsm8k.load_gsm8k("test", str(tmp_path)) == rows               # a directory
    assert gsm8k.load_gsm8k("test", str(tmp_path / "test.jsonl")) == rows  # a file


@pytest.mark.parametrize("rows,msg", [
    ([], "holds no problems"),
    ([{"question": "q"}], r"train.jsonl:1: no 'answer' field"),
    ([{"question": "q", "answer": "no final line"}], r"train.jsonl:1: the answer has no readable '#### <number>' line"),
])
def test_bad_datasets_are_clear_errors(tmp_path, rows, msg):
    path = tmp_path / "train.jsonl"
    if rows:
        write_jsonl(path, rows)
    else:
        path.write_text("")
    with pytest.raises(gsm8k.DataError, match=msg):
        gsm8k.load_gsm8k("train", str(path))


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(gsm8k.DataError, match="does not exist"):
        gsm8k.load_gsm8k("train", str(tmp_path / "missing"))
