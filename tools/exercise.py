"""
exercise.py: a student's copy of a trainer, for the course (docs/course.md) and the teacher's page (docs/teaching.md).

The algorithm's own functions keep their signature, docstring (the equation and the shapes) and a one-line hint;
their bodies raise NotImplementedError. Which functions are the algorithm's is read off the diff against grpo.py:
every function of the trainer's algorithm section that grpo.py lacks or that differs from grpo.py's, and for grpo.py
itself every one. Everything else is the trainer, byte for byte, so the copy runs as the original once filled in,
and the trainer's own spec tests grade it:

    python -m tools.exercise --trainers=grpo,gspo                     # writes exercises/grpo.py, exercises/gspo.py
    PYTHONPATH=. python exercises/grpo.py --tiny --run_dir=runs/ex-grpo   # the copy, run from the repository's root
    GRPO_EXERCISES=exercises python -m pytest -q tests/test_grpo.py   # the grade: the spec tests, on the copy

What it holds: Config; HINTS (one line per function a student writes); algorithm_functions (what a trainer's copy
blanks); student_copy (the copy's text); main.
"""
import ast
import os
from dataclasses import dataclass

from grpo_family import config
from tools import output, trainers

# the hint each blanked function carries, "trainer.function": a nudge toward the shape of the code, not the answer
HINTS = {
    "grpo.group_advantages": "view the rewards as (prompts, G); population std; where std < 1e-6 return exactly 0.",
    "grpo.kl_k3": "with log_r = ref_logp - logp the estimate is exp(log_r) - log_r - 1.",
    "grpo.policy_loss": "ratio = exp(logp - old_logp); min of the two surrogates per token; masked mean per sequence, "
                        "then the mean; the stats are (sum, count) pairs under no_grad.",
    "dapo.policy_loss": "GRPO's loss with two clip bounds, and one token sum over the whole batch / num_tokens, not a "
                        "mean per sequence.",
    "dapo.signed_correctness": "+1 for a correct final answer, -1 otherwise: gsm8k's checker decides which.",
    "dapo.overlong_penalty": "0 up to max_len - cache_len, then a linear ramp down to -1 at max_len, -1 beyond.",
    "dapo.keep_groups": "a group stays when its values are not all equal (max - min > 1e-6).",
    "dapo.gather_kept_groups": "all-gather every rank's kept groups, order them by key the same way everywhere, keep "
                               "batch_prompts of them and take this rank's slice.",
    "gspo.sequence_log_ratio": "the masked mean of logp - old_logp over each sequence's tokens: (B, T) -> (B,).",
    "gspo.policy_loss": "one ratio per sequence, exp(log s_i), for all its tokens (GSPO-token: the stop-gradient "
                        "form); two clip bounds; also count the clipped sequences.",
    "sapo.soft_gate": "a sigmoid of τ (ρ - 1), scaled by 4/τ so that its slope at ρ = 1 is one.",
    "sapo.gate_weight": "the gate's derivative over ρ: 4 p (1 - p) with p the sigmoid above.",
    "sapo.policy_loss": "τ_pos where Â > 0, τ_neg elsewhere; f(ρ) Â replaces the min and the clip.",
    "gfpo.retain_mask": "rank each group by its cost (length, or -reward / length) and keep the `keep` cheapest.",
    "gfpo.filtered_advantages": "group_advantages over each group's retained members only; the rest get 0.",
    "gfpo.difficulty_buckets": "each mean reward's percentile p in the history (ties count half); bucket "
                               "3 - floor(4p).",
    "gfpo.policy_loss": "GRPO's clipped surrogate, summed over tokens and divided by num_tokens (a token mean).",
    "gtpo.group_advantages": "GRPO's, and with scale=False only R - mean (the official code's choice).",
    "gtpo.conflict_runs": "a token counts while it sits at the same place in a positive and a negative completion "
                          "of its group, and every earlier one did too (a cumprod along t).",
    "gtpo.conflict_weights": "conflict runs from the front and, on reversed rows, from the back; positive "
                             "completions get the weight there, negative ones 0, every other token 1.",
    "gtpo.entropy_threshold": "'percentile' takes that percentile of the history, 'always' the threshold, 'paper' "
                              "the threshold only while h_ini is below it; otherwise inf.",
    "gtpo.shaped_advantages": "keep the completions whose entropy is <= threshold: A - γ H there, 0 elsewhere.",
    "gtpo.policy_loss": "GRPO's clipped loss with Â_it = λ_it A_i; with gspo_eps, GSPO-token's ratio and bounds.",
    "ppo.token_rewards": "r_t = -β (old_logp - ref_logp) on every token, plus the outcome on each row's last real "
                         "token (scatter_add); return the KL too.",
    "ppo.gae": "δ_t = r_t + γ V_{t+1} - V_t, then A_t = δ_t + γλ A_{t+1}, from the last token to the first; "
               "returns = A + V.",
    "ppo.masked_mean_var": "sums of x, x² and the mask in float64, all-reduced over ranks, then mean and variance.",
    "ppo.whiten": "(x - mean) / sqrt(var + 1e-8) with masked_mean_var's statistics; padding stays 0.",
    "ppo.explained_variance": "1 - Var[returns - values] / Var[returns], both over the mask and every rank.",
    "ppo.policy_loss": "the clipped surrogate with a per-token Â (B, T) and no KL term; token mean per sequence, "
                       "then the mean.",
    "ppo.value_loss": "half the larger squared error of V and of V clipped around V_old; token mean per sequence, "
                      "then the mean.",
    "ppo.rollout_values": "the critic in eval mode under autocast, micro-batch by micro-batch, then back to train.",
    "dpo.preference_pairs": "each group's first argmax and argmin rows as (chosen, rejected), where rewards differ.",
    "dpo.dpo_loss": "per sequence Σ_t (logπ - logπ_ref); pairs are consecutive rows; -logσ(β margin) summed over "
                    "pairs / num_pairs.",
    "drgrpo.group_advantages": "GRPO's with the division by std removed; all-equal groups still get exactly 0.",
    "drgrpo.policy_loss": "GRPO's with each sequence's token sum divided by max_len, not by its own length.",
    "cispo.policy_loss": "the clipped ratio is a detached weight on Â log π, so every token keeps its gradient; "
                         "token sum over the batch / num_tokens.",
    "rloo.group_advantages": "R_i minus the mean of the other G - 1 rewards of its group (all-equal groups: 0).",
    "rloo.policy_loss": "one ratio per completion, exp of its summed token log-ratios; clipped surrogate per "
                        "completion; no KL (it is in the reward).",
    "maxrl.group_advantages": "(R - mean) / mean per group (all-equal groups: 0).",
    "maxrl.policy_loss": "GRPO's clipped surrogate over one token mean for the whole batch (num_tokens).",
    "gmpo.policy_loss": "clip log ρ per token on the side Â pushes, exp of its masked mean per sequence (the "
                        "geometric mean), then Â_i s_i minus the mean KL.",
    "gdpo.group_advantages": "normalise each reward part within its group (sample std + 1e-4), weight and sum, then "
                             "whiten over the whole batch, every rank.",
    "dppo.policy_loss": "tokens whose probability moved more than δ (TV, or a binary KL) the way Â pushes get 0; "
                        "ratio × Â elsewhere; token sum / num_tokens.",
    "reinforcepp.reinforce_advantages": "r_i minus β × the KL still to come (flip, cumsum, flip), or r - group mean "
                                        "with baseline; whiten over every token of the batch.",
    "reinforcepp.kl_k2": "(log π - log π_ref)² / 2.",
    "reinforcepp.policy_loss": "the clipped surrogate with per-token Â (B, T), minus β k2 when beta > 0; token sum "
                               "/ num_tokens.",
}


@dataclass
class Config:
    trainers: str = "all"  # comma-separated trainers to write a student's copy of, or "all"
    out_dir: str = "exercises"  # where the copies go: <out_dir>/<trainer>.py
    overwrite: bool = False  # replace copies already in out_dir (a student's work there is lost)


def _algorithm_section(tree, lines):
    """The top-level functions between the '# the algorithm' and '# training' banners: {name: node}."""
    start = next(i for i, l in enumerate(lines) if l.startswith("# the algorithm"))
    end = next(i for i, l in enumerate(lines) if l.startswith("# training") and i > start)
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and start < n.lineno - 1 < end}


def _source(node, lines):
    return "\n".join(lines[node.lineno - 1:node.end_lineno])


def algorithm_functions(name):
    """The functions a student writes in trainer `name`: those of its algorithm section that grpo.py lacks or
    writes differently (for grpo.py, all of them), in file order."""
    lines = open(trainers.path(name)).read().splitlines()
    own = _algorithm_section(ast.parse("\n".join(lines)), lines)
    if name == "grpo":
        return list(own)
    base_lines = open(trainers.path("grpo")).read().splitlines()
    base = _algorithm_section(ast.parse("\n".join(base_lines)), base_lines)
    return [f for f, node in own.items() if f not in base or _source(node, lines) != _source(base[f], base_lines)]


def student_copy(name):
    """The text of trainer `name` with every algorithm function's body after its docstring replaced by its hint
    and `raise NotImplementedError`."""
    text = open(trainers.path(name)).read()
    lines = text.splitlines(keepends=True)
    nodes = _algorithm_section(ast.parse(text), [l.rstrip("\n") for l in lines])
    for fn in reversed(algorithm_functions(name)):  # from the bottom up, so earlier line numbers hold
        node = nodes[fn]
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise ValueError(f"{name}.py: {fn} has no docstring to keep (the student's copy needs its equation)")
        indent = " " * node.body[0].col_offset
        body = [f"{indent}# Hint: {HINTS[f'{name}.{fn}']}\n",
                f'{indent}raise NotImplementedError("{fn} is the exercise: write its body (docs/course.md)")\n']
        lines[doc.end_lineno:node.end_lineno] = body
    return "".join(lines)


def main():
    cfg = config.parse(Config)
    names = trainers.TRAINERS if cfg.trainers == "all" else [t.strip() for t in cfg.trainers.split(",") if t.strip()]
    unknown = [t for t in names if t not in trainers.TRAINERS]
    if unknown or not names:
        raise config.UserError(f"unknown trainer(s) {unknown} in --trainers: choose from {', '.join(trainers.TRAINERS)}"
                               " or all")
    output.writable_dir(cfg.out_dir, f"--out_dir={cfg.out_dir}")  # before any copy is written
    present = [t for t in names if os.path.exists(os.path.join(cfg.out_dir, f"{t}.py"))]
    if present and not cfg.overwrite:
        raise config.UserError(f"{cfg.out_dir} already holds {', '.join(p + '.py' for p in present)} (a student's "
                               "work?): pass --overwrite to replace them, or another --out_dir")
    for t in names:
        output.write(os.path.join(cfg.out_dir, f"{t}.py"), student_copy(t), "free disk space or pick another --out_dir")
        print(f"{cfg.out_dir}/{t}.py: write {', '.join(algorithm_functions(t))}")
    print(f"\nrun one:   PYTHONPATH=. python {cfg.out_dir}/{names[0]}.py --tiny --run_dir=runs/ex-{names[0]}\n"
          f"grade one: GRPO_EXERCISES={cfg.out_dir} python -m pytest -q tests/test_{names[0]}.py")


if __name__ == "__main__":
    config.run(main)
