"""
evaluation.py: held-out accuracy, one function for the trainers' periodic eval and eval_gsm8k.py.

    evaluate          greedy pass@1, or n samples per problem, sharded over ranks, merged in order
    score_problem     one problem's record: completions, extracted answers, strict/lenient/format
    summarize_eval    rates over problems with 95% Wilson intervals; pass@k and majority vote
    pass_at_k, majority_vote, wilson_interval, default_ks    the statistics
"""
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from grpo_family import distributed, fsdp, rollout
from grpo_family.gsm8k import (SYSTEM_PROMPT, build_prompt, correctness_reward, extract_answer, extract_last_number,
                               format_reward, lenient_correct)

# -----------------------------------------------------------------------------
# statistics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers; C(n-c, k) = 0 when k > n-c


def majority_vote(answers):
    """The most frequent non-None answer, ties broken by first occurrence; None if every answer is None."""
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    # dicts keep insertion (first-occurrence) order and max() returns the first maximal key
    return max(counts, key=counts.get) if counts else None


def wilson_interval(p, n, z=1.96):
    """The 95% Wilson score interval (lo, hi) for a rate p measured on n trials; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def default_ks(n):
    """The k of pass@k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def _answer_str(x):
    """An extracted Fraction as JSON-friendly text ('18', '5/2'), or None."""
    return None if x is None else str(x)


def score_problem(index, problem, texts, truncated):
    """The prediction record of one problem: its n completions, their extracted answers and scores."""
    ref = extract_answer(problem["answer"])
    strict = [extract_answer(t) for t in texts]
    last = [extract_last_number(t) for t in texts]
    maj, maj_lenient = majority_vote(strict), majority_vote(last)
    return {"index": index, "question": problem["question"], "reference": _answer_str(ref),
            "completions": list(texts), "extracted": [_answer_str(a) for a in strict],
            "last_number": [_answer_str(a) for a in last],
            "correct": [correctness_reward(t, problem["answer"]) == 1.0 for t in texts],
            "lenient": [lenient_correct(t, problem["answer"]) == 1.0 for t in texts],
            "format": [format_reward(t) == 1.0 for t in texts], "truncated": [bool(x) for x in truncated],
            "majority": _answer_str(maj), "majority_correct": maj is not None and maj == ref,
            "majority_lenient": _answer_str(maj_lenient),
            "majority_lenient_correct": maj_lenient is not None and maj_lenient == ref}


def summarize_eval(records, ks=None):
    """Rates over problems (each problem's mean over its n samples) with Wilson bounds <key>_lo/<key>_hi.

    strict/lenient/format are pass@1 averaged over the n samples; with n > 1 also pass@k (strict, for k
    in ks) and maj / maj_lenient (majority vote). The interval treats the problems as the trials: exact
    binomial variance for 0/1 scores, conservative for per-problem means in [0, 1] (their variance is at
    most p(1-p)).
    """
    N, n = len(records), len(records[0]["completions"])
    mean = lambda key: math.fsum(sum(r[key]) / n for r in records) / N  # noqa: E731
    rates = {"strict": mean("correct"), "lenient": mean("lenient"), "format": mean("format")}
    if n > 1:
        for k in (ks or default_ks(n)):
            rates[f"pass@{k}"] = math.fsum(pass_at_k(n, sum(r["correct"]), k) for r in records) / N
        rates["maj"] = math.fsum(r["majority_correct"] for r in records) / N
        rates["maj_lenient"] = math.fsum(r["majority_lenient_correct"] for r in records) / N
    out = dict(rates)
    for key, p in rates.items():
        out[f"{key}_lo"], out[f"{key}_hi"] = wilson_interval(p, N)
    out.update(truncated=mean("truncated"), n=N, samples=n)
    return out


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, tok, problems, d, max_new_tokens, batch_size=64, system_prompt=SYSTEM_PROMPT, n=1,
             temperature=0.0, top_p=1.0, ks=None, seed=0, progress=False, return_predictions=False, fast=False):
    """Accuracy on `problems`, sharded over ranks: greedy pass@1 (temperature 0) or n samples per problem.

    Returns summarize_eval's dict (strict, lenient, format, n, ...); with return_predictions=True, the
    tuple (metrics, records) with one record per problem in problem order, the same on every rank.
    batch_size counts completions per generate call, so a batch holds batch_size // n problems.
    fast=True generates with decoder.fast_decode (static KV cache) instead of Hugging Face generate.
    """
    if not problems:
        raise ValueError("evaluate: no problems to evaluate")
    if n < 1 or (n > 1 and temperature <= 0):
        raise ValueError(f"evaluate: n={n} samples at temperature={temperature}: n must be >= 1, and n > 1 "
                         "needs temperature > 0 (greedy samples would all be identical)")
    if ks and any(not 1 <= k <= n for k in ks):
        raise ValueError(f"evaluate: every k of pass@k must be in 1..n={n}, got {list(ks)}")
    rollout.check_context(model, tok, [build_prompt(tok, p["question"], system_prompt) for p in problems],
                          max_new_tokens)  # before any batch: one line naming the prompt
    # --fsdp: the whole network gathered here, on every rank, even one with no batch below
    model = fsdp.decode_copy(model, distributed.cuda_numerics(d.device))
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // n)
    starts = range(0, len(problems), per_batch)
    # Shard whole batches, not problems: batch j holds the same problems (hence the same padding) and
    # draws from the same seed (seed + j) on any number of ranks, so results do not depend on it.
    mine = range(d.rank, len(starts), d.world_size)
    if progress and d.master_process:
        from tqdm import tqdm
        mine = tqdm(mine, desc="eval", unit="batch")
    greedy = temperature <= 0
    cuda = [torch.cuda.current_device()] if d.device.type == "cuda" else []
    records = []
    for j in mine:
        batch = problems[starts[j]:starts[j] + per_batch]
        prompts = [build_prompt(tok, p["question"], system_prompt) for p in batch]
        ids, mask = rollout.tokenize_prompts(tok, prompts, d.device)
        with nullcontext() if greedy else torch.random.fork_rng(devices=cuda):  # a trainer's RNG stream is untouched
            if not greedy:
                torch.manual_seed(seed + j)
            r = rollout.generate(model, tok, ids, mask, n, max_new_tokens, temperature, top_p, greedy=greedy, fast=fast)
        for i, p in enumerate(batch):
            rows = slice(i * n, (i + 1) * n)
            records.append(score_problem(starts[j] + i, p, r.texts[rows], r.truncated[rows].tolist()))
    model.train(was_training)
    if d.ddp:  # every rank gets every record; merged in problem order, so sums run in the same order
        parts = [None] * d.world_size
        dist.all_gather_object(parts, records)
        records = [rec for part in parts for rec in part]
    records.sort(key=lambda rec: rec["index"])
    metrics = summarize_eval(records, ks)
    return (metrics, records) if return_predictions else metrics
