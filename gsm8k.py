"""
gsm8k.py: the GSM8K task, as nanochat keeps tasks/gsm8k.py: loading, prompts, answers, rewards.

    load_gsm8k, check_problems      problems [{question, answer}] from local jsonl or the hub
    build_prompt                    the chat-templated prompt of one question
    parse_number, extract_answer,   the number after the last '####' (strict) or the last number
    extract_last_number             anywhere (lenient), as exact Fractions
    correctness_reward,             the reward terms: '####' answer right, last line well formed,
    format_reward, lenient_correct  last number right
"""
import os
import re
from fractions import Fraction

SYSTEM_PROMPT = ("Solve the math problem step by step. "
                 "On the last line write the final answer as '#### <number>'.")
GSM8K_HUB = "openai/gsm8k"

# -----------------------------------------------------------------------------
# data


def load_gsm8k(split, data_path=""):
    """GSM8K problems [{question, answer}] from local jsonl (`data_path` file or dir) or the hub."""
    from datasets import load_dataset  # imported here: only data loading needs `datasets`
    if data_path:
        path = os.path.expanduser(data_path)
        if os.path.isdir(path):
            path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GSM8K {split} file {path!r} does not exist")
        if not open(path).read().strip():
            raise ValueError(f"dataset {path!r} is empty")
        ds = load_dataset("json", data_files=path, split="train")
    else:
        ds = load_dataset(GSM8K_HUB, "main", split=split)
    return check_problems([dict(row) for row in ds], source=data_path or GSM8K_HUB)


def check_problems(rows, source):
    """Raise on an empty dataset or a row without a question and a '#### answer'."""
    if not rows:
        raise ValueError(f"dataset {source!r} is empty")
    for i, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"dataset {source!r} row {i} needs string fields 'question' and 'answer', got {sorted(row)}")
        if extract_answer(row["answer"]) is None:
            raise ValueError(f"dataset {source!r} row {i}: answer has no '#### <number>' line: {row['answer'][-80:]!r}")
    return rows


def build_prompt(tok, question, system_prompt=SYSTEM_PROMPT):
    """The chat-templated prompt string for one question (system message omitted if empty)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": question})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -----------------------------------------------------------------------------
# answers: GSM8K answer extraction and exact numeric comparison

_NUM = r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d[\d,]*)?|-?\$?\s*\.\d+"


def parse_number(text):
    """'$1,234.50', '-3', '3/4', '.5' -> exact Fraction, or None if `text` holds no number."""
    if text is None:
        return None
    m = re.search(_NUM, text)
    if m is None:
        return None
    s = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text):
    """Strict: the number after the last '####', as a Fraction (None if absent)."""
    if "####" not in text:
        return None
    return parse_number(text.rsplit("####", 1)[1])


def extract_last_number(text):
    """Lenient: the last number anywhere in the text, as a Fraction (None if there is none)."""
    found = re.findall(_NUM, text)
    return parse_number(found[-1]) if found else None


# -----------------------------------------------------------------------------
# rewards: each is fn(completion, reference answer) -> float


def correctness_reward(completion, answer):
    """1.0 if the '####' answer of the completion equals the reference answer numerically."""
    pred, ref = extract_answer(completion), extract_answer(answer)
    return float(pred is not None and ref is not None and pred == ref)


def format_reward(completion, answer=None):
    """1.0 if the completion's last non-empty line is exactly '#### <number>'."""
    lines = [l.strip() for l in completion.strip().splitlines() if l.strip()]
    return float(bool(lines) and re.fullmatch(r"####\s*(" + _NUM + r")", lines[-1]) is not None)


def lenient_correct(completion, answer):
    """1.0 if the last number in the completion equals the reference answer (any format)."""
    pred, ref = extract_last_number(completion), extract_answer(answer)
    return float(pred is not None and ref is not None and pred == ref)
