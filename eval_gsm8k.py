"""
eval_gsm8k.py: one GSM8K evaluator for before and after training, with every view of the score.

The same Qwen2.5-1.5B-Instruct scores anywhere from a few percent to over 70% on GSM8K depending
only on the prompt and on how the answer is parsed, so this script fixes both to what training uses
(gsm8k.build_prompt, gsm8k.extract_answer, gsm8k.correctness_reward, ...) and reports all views:

    strict   the number after the completion's last '####' equals the reference (the trained format)
    lenient  the last number anywhere in the completion equals the reference
    format   the completion's last non-empty line is exactly '#### <number>'
    pass@k   with n > 1 samples: unbiased 1 - C(n-c, k) / C(n, k), strict answers
             (Chen et al. 2021, arXiv 2107.03374, eq. 1)
    maj      with n > 1 samples: majority vote over the '####' answers, ties won by the answer that
             occurs first; maj_lenient votes over the last numbers

each with the number of problems and a 95% Wilson score interval that treats the problems as the
trials. The trainers' periodic held-out eval calls the same function, evaluation.evaluate.

Launch:
    python eval_gsm8k.py                                   # Qwen2.5-1.5B-Instruct, GSM8K test (1,319), greedy
    python eval_gsm8k.py --model=runs/grpo                 # a run dir (its `latest` checkpoint) or a ckpt dir
    python eval_gsm8k.py --num_samples=16 --temperature=1  # pass@1/2/4/8/16 and majority vote
    torchrun --nproc_per_node=8 eval_gsm8k.py --model=...  # batches sharded over ranks, results merged
    python eval_gsm8k.py --tiny                            # the tiny model on the tiny task (CPU, seconds)
    python eval_gsm8k.py --tiny --model=runs/grpo-tiny     # the checkpoint of `python grpo.py --tiny`

Writes <out_dir>/predictions.jsonl (one line per problem, in problem order: question, completions,
extracted answers, correctness) and <out_dir>/summary.json (metrics, intervals, protocol, config).
Greedy results are identical on any number of ranks: see evaluation.evaluate.
"""
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

from grpo_family import config, distributed, evaluation, gsm8k, loading, logs, tiny


@dataclass
class Config:
    tiny: bool = False  # the tiny model and the tiny task's test split (CPU); --model and --data_path still win
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub name, model dir, checkpoint dir, run dir (its `latest`), or "tiny"
    data_path: str = ""  # GSM8K: a jsonl file, a dir with <split>.jsonl, "tiny", or "" (the hub, openai/gsm8k)
    split: str = "test"  # dataset split, in {test, train} (GSM8K test: 1,319 problems)
    limit: int = -1  # evaluate only the first `limit` problems, in [-1, inf) (-1 = all)
    # not `--n`: torchrun's argument parser would take --n=... for an abbreviation of its --nnodes
    num_samples: int = 1  # n per problem, in [1, inf): 1 = pass@1; > 1 adds pass@k and majority vote (temperature > 0)
    ks: str = ""  # comma-separated k for pass@k, each in 1..n ("" = 1, 2, 4, ... up to n, and n)
    temperature: float = 0.0  # in [0, inf): 0 = greedy decoding; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling cut when temperature > 0, in (0, 1] (1.0 = off)
    max_new_tokens: int = 512  # completion length cap, in [1, inf) (the trainers' periodic eval uses their own: 300)
    batch_size: int = 64  # completions per generate call, in [1, inf) (a batch holds batch_size // n problems)
    system_prompt: str = gsm8k.SYSTEM_PROMPT  # system message of the chat prompt ("" = none); as in training
    seed: int = 0  # sampling seed, in [0, 1e18] (batch j uses seed + j: samples do not depend on the ranks)
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before the run stops, in [1, 1e7]
    fast_rollout: bool = False  # generate with the static-KV-cache decoder (decoder.py) instead of HF generate
    out_dir: str = "runs/eval"  # predictions.jsonl and summary.json go here


# --tiny: the tiny model (unless --model is given) with the settings the tiny trainers use
TINY = dict(model="tiny", data_path="tiny", max_new_tokens=32, system_prompt="", out_dir="runs/eval-tiny")


def check_config(cfg):
    """Raise on settings that would evaluate nothing or make no sense, before anything is loaded."""
    if not cfg.model:
        raise config.UserError("--model is empty: give a hub name, a local model, checkpoint or run dir, or tiny")
    if cfg.limit == 0 or cfg.limit < -1:
        raise config.UserError(f"--limit={cfg.limit} evaluates no problems: give a positive number, or -1 for all")
    if cfg.num_samples < 1:
        raise config.UserError(f"--num_samples={cfg.num_samples}: need at least 1 sample per problem")
    if cfg.num_samples > 1 and cfg.temperature <= 0:
        raise config.UserError(f"--num_samples={cfg.num_samples} needs --temperature > 0 "
                               "(greedy samples are identical)")
    if not 0 < cfg.top_p <= 1:
        raise config.UserError(f"--top_p={cfg.top_p} must be in (0, 1]")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise config.UserError("--batch_size and --max_new_tokens must be positive")
    parse_ks(cfg.ks, cfg.num_samples)
    if loading.holds_model(cfg.out_dir):
        raise config.UserError(f"--out_dir={cfg.out_dir} holds a model or a run: name another folder for "
                               "predictions.jsonl and summary.json")
    try:  # the results are written after the whole evaluation: find out now that they can be
        os.makedirs(cfg.out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=cfg.out_dir):
            pass
    except OSError as e:
        raise config.UserError(f"--out_dir={cfg.out_dir} is not a writable folder ({e.strerror}): "
                               "pick another") from None


def parse_ks(text, n):
    """'1,4,16' -> [1, 4, 16] (each in 1..n); '' -> the default ks for n samples (None when n = 1)."""
    if not text:
        return evaluation.default_ks(n) if n > 1 else None
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise config.UserError(f"--ks={text!r} must be comma-separated integers, e.g. --ks=1,4,16") from None
    if any(not 1 <= k <= n for k in ks):
        raise config.UserError(f"--ks={text!r}: every k of pass@k must be in 1..n={n}")
    return ks


def load_eval_problems(cfg):
    """The problems: the tiny task, local jsonl or the hub (--data_path), the first `limit` of them."""
    problems = tiny.dataset(cfg.split) if cfg.data_path == "tiny" else gsm8k.load_gsm8k(cfg.split, cfg.data_path)
    return problems if cfg.limit == -1 else problems[:cfg.limit]


def report(metrics, cfg, model_path, source):
    """The summary as printed: one line per view of the score, with its 95% Wilson interval."""
    mode = ("greedy pass@1" if cfg.temperature <= 0 else
            f"n={cfg.num_samples} samples, temperature={cfg.temperature}, top_p={cfg.top_p}")
    lines = [f"model: {model_path}",
             f"data: {source} {cfg.split}, {metrics['n']} problems, {mode}, max_new_tokens={cfg.max_new_tokens}"]
    views = [("strict", "the '####' answer equals the reference"),
             ("lenient", "the last number equals the reference"),
             ("format", "the last line is exactly '#### <number>'")]
    ks = [k for k in metrics if k.startswith("pass@") and k + "_lo" in metrics]
    views += [(k, "unbiased estimator, strict answers") for k in ks]
    if cfg.num_samples > 1:
        views += [("maj", "majority vote over the '####' answers"), ("maj_lenient", "majority vote over last numbers")]
    for key, what in views:
        lo, hi = metrics[key + "_lo"], metrics[key + "_hi"]
        lines.append(f"  {key:<12} {metrics[key]:.4f}  95% CI [{lo:.4f}, {hi:.4f}]  {what}")
    lines.append(f"  {'truncated':<12} {metrics['truncated']:.4f}  no EOS within max_new_tokens")
    lines.append(f"intervals: 95% Wilson score intervals, the {metrics['n']} problems as trials")
    return "\n".join(lines)


def main(argv=None):
    cfg = config.parse(Config, argv, tiny=TINY)
    check_config(cfg)
    d = distributed.setup(cfg)
    log = print if d.master_process else (lambda *a, **k: None)
    log("versions:", json.dumps(versions := logs.versions()))
    model_path = loading.model_path(cfg.model, d)
    problems = load_eval_problems(cfg)
    source = {"tiny": "tiny task", "": gsm8k.GSM8K_HUB}.get(cfg.data_path, cfg.data_path)
    tok = loading.tokenizer(model_path)
    model = loading.model(model_path, d.device)

    t0 = time.time()
    metrics, records = evaluation.evaluate(model, tok, problems, d, cfg.max_new_tokens, cfg.batch_size,
                                           cfg.system_prompt, n=cfg.num_samples, temperature=cfg.temperature,
                                           top_p=cfg.top_p, ks=parse_ks(cfg.ks, cfg.num_samples), seed=cfg.seed,
                                           progress=True, return_predictions=True, fast=cfg.fast_rollout)
    seconds = time.time() - t0

    if d.master_process:  # every rank holds all records, merged in problem order; rank 0 writes them
        os.makedirs(cfg.out_dir, exist_ok=True)
        pred_path = os.path.join(cfg.out_dir, "predictions.jsonl")
        summary_path = os.path.join(cfg.out_dir, "summary.json")
        with open(pred_path, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        summary = {"model": model_path, "data": source, "split": cfg.split, "problems": metrics["n"],
                   "samples_per_problem": cfg.num_samples,
                   "decoding": "greedy" if cfg.temperature <= 0 else "sampling",
                   "interval": "95% Wilson score interval, problems as trials", "metrics": metrics,
                   "example_prompt": gsm8k.build_prompt(tok, problems[0]["question"], cfg.system_prompt),
                   "config": asdict(cfg), "world_size": d.world_size, "eval_seconds": round(seconds, 1),
                   "versions": versions}
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        log(report(metrics, cfg, model_path, source))
        log(f"wrote {pred_path} ({len(records)} lines) and {summary_path} "
            f"({seconds:.1f}s on {d.world_size} process{'es' if d.world_size > 1 else ''})")
    distributed.cleanup(d)
    return metrics


if __name__ == "__main__":
    config.run(main)
