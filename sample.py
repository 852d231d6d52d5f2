"""
sample.py: see what a model or checkpoint says, with the answer and reward training would give it.

Prompts come from exactly one source: --prompt (one question), --prompt_file (a text file with one
question per line, or a .jsonl file with 'question' and optional 'answer' fields), or by default the
first --num_questions test questions (GSM8K; the tiny task with --tiny; --data_path for local jsonl).
Each prompt is built by gsm8k.build_prompt, as in training. Every completion is printed with its
extracted '####' answer and, when a reference answer is known, its strict and lenient correctness,
format, and the trainers' reward (correctness + format_weight * format).

Launch:
    python sample.py --tiny                                           # 3 tiny test questions, greedy
    python sample.py --tiny --model=runs/grpo-tiny --num_samples=4 --temperature=1.0
    python sample.py --model=runs/grpo --prompt="What is 12 * 7 - 5?"
    python sample.py --model=Qwen/Qwen2.5-1.5B-Instruct --prompt_file=questions.txt --num_samples=2 --temperature=0.7
"""
import json
import os
from dataclasses import dataclass

import torch

from grpo_family import config, distributed, gsm8k, loading, logs, rollout, tiny


@dataclass
class Config:
    tiny: bool = False  # the tiny model and the tiny task's test questions; --model and --data_path still win
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name, model dir, checkpoint dir, run dir (its `latest`), or "tiny"
    prompt: str = ""  # one question to answer
    prompt_file: str = ""  # one question per line, or a .jsonl with 'question' (and optional 'answer') per line
    num_questions: int = 3  # otherwise: the first this many test questions, in [1, inf)
    data_path: str = ""  # GSM8K for those questions: a jsonl file, a dir with test.jsonl, "tiny", or "" (the hub)
    num_samples: int = 1  # completions per prompt, in [1, inf) (> 1 needs temperature > 0)
    temperature: float = 0.0  # in [0, inf): 0 = greedy decoding; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling cut when temperature > 0, in (0, 1] (1.0 = off)
    max_new_tokens: int = 512  # completion length cap, in [1, inf)
    batch_size: int = 64  # completions per generate call, in [1, inf)
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt ("" = none); same as training
    format_weight: float = 0.1  # reward = correctness (0/1) + format_weight * format (0/1), in [0, inf), as in training
    seed: int = 0  # sampling seed, in [0, 1e18]


TINY = dict(model="tiny", data_path="tiny", max_new_tokens=32, system_prompt="")


def read_prompt_file(path):
    """[{question, answer or None}] from a text file (one question per line) or a .jsonl file; raise if empty."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise config.UserError(f"prompt file {path} does not exist")
    if not path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                rows = [{"question": line.strip(), "answer": None} for line in f if line.strip()]
        except UnicodeDecodeError as e:  # a binary file, or text in another encoding
            raise config.UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        if any("\x00" in r["question"] for r in rows):
            raise config.UserError(f"{path}: holds NUL bytes, so it is not a text file of questions")
    else:
        rows = []
        for where, row in gsm8k.read_jsonl(path):  # where = 'file:line', 1-based, blank lines counted
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise config.UserError(f"{where}: expected a JSON object with a string field 'question'")
            answer = row.get("answer")
            if answer is not None:  # a full GSM8K solution, or just the final number; checked before generating
                text = answer if isinstance(answer, str) else str(answer)
                try:
                    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                        raise ValueError
                    gsm8k.reference_answer(text)
                except ValueError:
                    raise config.UserError(f"{where}: 'answer' {answer!r:.40} is not a number nor a solution ending in "
                                           "'#### <number>'; fix it or leave the field out") from None
                answer = text if "####" in text else f"#### {text}"
            rows.append({"question": row["question"], "answer": answer})
    if not rows:
        raise config.UserError(f"prompt file {path} has no prompts (it is empty or only blank lines)")
    return rows


def load_prompts(cfg):
    """The prompts to sample for: --prompt, else --prompt_file, else the first num_questions test questions."""
    if cfg.prompt and cfg.prompt_file:
        raise config.UserError("give either --prompt or --prompt_file, not both")
    if cfg.prompt:
        return [{"question": cfg.prompt, "answer": None}]
    if cfg.prompt_file:
        return read_prompt_file(cfg.prompt_file)
    if cfg.num_questions < 1:
        raise config.UserError(f"--num_questions={cfg.num_questions} selects no questions: give a positive number, "
                               "or --prompt / --prompt_file")
    rows = tiny.dataset("test") if cfg.data_path == "tiny" else gsm8k.load_gsm8k("test", cfg.data_path)
    return rows[:cfg.num_questions]


def describe(text, answer, format_weight):
    """One line: the extracted answer and, if the reference is known, correctness, format and reward."""
    pred, fmt = gsm8k.extract_answer(text), gsm8k.format_reward(text)
    out = f"answer {pred if pred is not None else '(none)'} | format {fmt:.0f}"
    if answer is None:
        return out + " | reward n/a (no reference answer)"
    strict, lenient = gsm8k.correctness_reward(text, answer), gsm8k.lenient_correct(text, answer)
    return out + f" | strict {strict:.0f} | lenient {lenient:.0f} | reward {strict + format_weight * fmt:.2f}"


def main(argv=None):
    cfg = config.parse(Config, argv, tiny=TINY)
    n = cfg.num_samples
    if n < 1 or (n > 1 and cfg.temperature <= 0):
        raise config.UserError(f"--num_samples={n}: need at least 1, and more than 1 needs --temperature > 0 "
                               "(greedy samples are identical)")
    if not cfg.model:
        raise config.UserError("--model is empty: give a hub name, a local model, checkpoint or run dir, or tiny")
    prompts = load_prompts(cfg)  # prompt errors surface before any model is loaded
    print("versions:", json.dumps(logs.versions()), flush=True)
    d = distributed.Dist(False, 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), True)
    model_path = loading.model_path(cfg.model, d)
    tok = loading.tokenizer(model_path)
    model = loading.model(model_path, d.device)
    distributed.seed_everything(cfg.seed)
    mode = "greedy" if cfg.temperature <= 0 else f"temperature={cfg.temperature}, top_p={cfg.top_p}"
    print(f"model: {model_path}  ({len(prompts)} prompt(s) x {n} completion(s), {mode})")
    per_batch = max(1, cfg.batch_size // n)
    texts = [gsm8k.build_prompt(tok, p["question"], cfg.system_prompt) for p in prompts]
    rollout.check_context(model, tok, texts, cfg.max_new_tokens)  # before generating anything
    for s in range(0, len(prompts), per_batch):
        batch = prompts[s:s + per_batch]
        ids, mask = rollout.tokenize_prompts(tok, texts[s:s + per_batch], d.device)
        r = rollout.generate(model, tok, ids, mask, n, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                             greedy=cfg.temperature <= 0)
        for i, p in enumerate(batch):
            ref = f" (reference answer {gsm8k.extract_answer(p['answer'])})" if p["answer"] else ""
            print(f"\n=== prompt {s + i + 1}/{len(prompts)}{ref}")
            print(p["question"])
            for k in range(n):
                row = i * n + k
                trunc = " | truncated" if r.truncated[row] else ""
                print(f"--- completion {k + 1}/{n}: {describe(r.texts[row], p['answer'], cfg.format_weight)}{trunc}")
                print(r.texts[row])


if __name__ == "__main__":
    config.run(main)
