"""
token_lengths.py: what GSM8K costs in a tokenizer's tokens: the trainers' chat prompt of each question, and each
reference solution with the EOS a completion ends with (README's table, in Qwen2.5's tokens).

    python -m tools.token_lengths --tokenizer=DIR --data_path=DIR   # a tokenizer or model dir; GSM8K's dir
    python -m tools.token_lengths --tokenizer=DIR                   # GSM8K from the hub

What it holds: token_lengths (the counts), percentiles (nearest-rank), Config and main (the table).
"""
import math
from dataclasses import dataclass

from grpo_family import config, gsm8k, loading


@dataclass
class Config:
    tokenizer: str = ""  # a tokenizer or model dir (or hub name) whose tokens are counted
    data_path: str = ""  # GSM8K: a dir with train.jsonl and test.jsonl ("" = the hub)
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt, as the trainers send it


def percentiles(xs):
    """{min, p50, p90, p99, max, mean} of a list of numbers (nearest-rank percentiles)."""
    xs = sorted(xs)
    at = lambda q: xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]  # noqa: E731
    return {"min": xs[0], "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": xs[-1],
            "mean": round(sum(xs) / len(xs), 1)}


def token_lengths(tok, problems, system_prompt=gsm8k.SYSTEM_PROMPT):
    """{'n', 'prompt': percentiles, 'solution': percentiles} of the problems in `tok`'s tokens."""
    prompts = tok([gsm8k.build_prompt(tok, p["question"], system_prompt) for p in problems], add_special_tokens=False)
    solutions = tok([p["answer"] for p in problems], add_special_tokens=False)
    return {"n": len(problems), "prompt": percentiles([len(x) for x in prompts["input_ids"]]),
            "solution": percentiles([len(x) + 1 for x in solutions["input_ids"]])}


def main():
    cfg = config.parse(Config)
    if not cfg.tokenizer:
        raise config.UserError("give --tokenizer=<a tokenizer or model dir>, e.g. Qwen2.5's")
    tok = loading.tokenizer(cfg.tokenizer)
    print(f"{'split':<6}{'text':>10}{'n':>7}{'min':>6}{'p50':>6}{'p90':>6}{'p99':>6}{'max':>6}{'mean':>8}")
    for split in ("train", "test"):
        st = token_lengths(tok, gsm8k.load_gsm8k(split, cfg.data_path), cfg.system_prompt)
        for key in ("prompt", "solution"):
            print(f"{split:<6}{key:>10}{st['n']:>7}" + "".join(f"{st[key][k]:>6}" for k in ("min", "p50", "p90",
                  "p99", "max")) + f"{st[key]['mean']:>8}")


if __name__ == "__main__":
    config.run(main)
