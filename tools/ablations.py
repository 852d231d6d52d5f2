"""
ablations.py: GRPO with one thing taken out, on the tiny default, 3 seeds each: the course's ablations (docs/course.md,
lesson 3), as in Stanford CS336's GRPO assignment. Each ablation is grpo.py run by its own main() with one of its
functions swapped for a few lines below (or with one flag), so the whole difference is on this page:

    grpo            grpo.py as it is (the reference row)
    no_baseline     Â_i = R_i: no group mean subtracted, no std
    no_std          Â_i = R_i - mean(R): Dr. GRPO's group_advantages (drgrpo.py)
    no_length_norm  each completion's token sum over L_max = --max_new_tokens, not over |o_i|: Dr. GRPO's policy_loss
    off_policy      --num_minibatches=8: 8 optimizer steps per rollout batch instead of --tiny's 2
    no_clip         off_policy with ε = inf: ρ Â unclipped (the clip only acts off-policy, so both run 8 steps)

Why not flags in grpo.py: a flag there would add its lines to every other trainer's diff against grpo.py.

    python -m tools.ablations                  # every ablation x 3 seeds (9 min on an idle 2-core machine), then
                                               # the table and figure, from the compact log it writes
    python -m tools.ablations --logs_only      # only the table and figure, from the committed log

What it holds: Config; ABLATIONS (name -> what changes, the swap, extra flags); no_baseline, no_std, no_length_norm,
no_clip (the swaps); run_one (one ablation in this process); compact (a run's log, kept small); load, table, main.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

from grpo_family import config, jsonfile
from tools import compare

import drgrpo
import grpo


@dataclass
class Config:
    ablations: str = "all"  # comma-separated names from ABLATIONS, or all
    seeds: int = 3  # seeds 0 .. seeds-1 for every ablation, in [1, 100]
    out_dir: str = "runs/ablations"  # one run dir per (ablation, seed): <out_dir>/<name>-s<seed>
    jobs: int = 2  # runs at once (each gets OMP_NUM_THREADS = cores / jobs), in [1, 64]
    metrics: str = "docs/course/ablations.jsonl"  # the compact log of every run: written after the runs, read here
    figure: str = "docs/course/ablations.png"  # the figure (needs matplotlib)
    logs_only: bool = False  # run nothing: the table and figure from --metrics
    extra: str = ""  # extra grpo.py flags for every run, space-separated (e.g. "--num_steps=20"); an ablation's win


# -----------------------------------------------------------------------------
# the swaps: each replaces one function of grpo.py for one run


def no_baseline(rewards, group_size):
    """Â_i = R_i: every sampled completion is pushed up by its raw reward (REINFORCE without a baseline)."""
    return rewards.clone()


def no_std(rewards, group_size):
    """Â_i = R_i - mean(R): Dr. GRPO's advantages (all-equal groups still 0)."""
    return drgrpo.group_advantages(rewards, group_size)


def no_length_norm(max_len):
    """GRPO's loss with each completion's token sum over the constant max_len: Dr. GRPO's policy_loss."""
    def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta):
        return drgrpo.policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, max_len)
    return policy_loss


def no_clip(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, _grpo_loss=grpo.policy_loss):
    """GRPO's loss with ε = inf: min(ρÂ, clip(ρ)Â) = ρÂ, so no token loses its gradient."""
    return _grpo_loss(logp, old_logp, ref_logp, advantages, mask, math.inf, beta)  # grpo.py's own, not the swap


# name: (what changes, {grpo function: its replacement, given the run's Config}, extra flags)
ABLATIONS = {
    "grpo": ("nothing: grpo.py --tiny", {}, []),
    "no_baseline": ("Â = R (no group mean, no std)", {"group_advantages": lambda cfg: no_baseline}, []),
    "no_std": ("Â = R - mean(R) (no /std)", {"group_advantages": lambda cfg: no_std}, []),
    "no_length_norm": ("token sum / L_max, not / len(o_i)",
                       {"policy_loss": lambda cfg: no_length_norm(cfg.max_new_tokens)}, []),
    "off_policy": ("8 optimizer steps per rollout, not 2", {}, ["--num_minibatches=8"]),
    "no_clip": ("8 steps per rollout and ε = inf", {"policy_loss": lambda cfg: no_clip}, ["--num_minibatches=8"]),
}

KEEP = ("step", "eval/strict", "eval/lenient", "reward", "accuracy", "response_length", "entropy",
        "clip_frac")  # the columns the table and compare's panels read, each to 6 significant digits


def run_one(name, argv):
    """Run grpo.py's main() in this process with `name`'s swaps and flags: `argv` are grpo.py's own flags."""
    _, swaps, flags = ABLATIONS[name]
    sys.argv = ["grpo.py", *argv, *flags]
    cfg = config.parse(grpo.Config, tiny=grpo.TINY)  # the run's settings, for a swap that needs one (max_len)
    for fn, make in swaps.items():
        setattr(grpo, fn, make(cfg))
    print(f"ablation {name}: {ABLATIONS[name][0]} (grpo.py's {', '.join(swaps) or 'code unchanged'}; flags "
          f"{' '.join(flags) or 'none'})", flush=True)  # the run dir is grpo's; its stdout.log says what changed
    config.run(grpo.main)


def compact(out_dir, names, seeds, walls):
    """Every run's metrics rows, reduced to KEEP, tagged with its ablation and seed (and its wall time, last row)."""
    rows = []
    for name, seed_rows in compare.load_runs(out_dir, names, seeds).items():
        for seed, log in enumerate(seed_rows):
            for r in log:
                rows.append({"ablation": name, "seed": seed, **{k: float(f"{r[k]:.6g}") if isinstance(r[k], float)
                                                                 else r[k] for k in KEEP if k in r}})
            rows[-1]["wall_s"] = round(walls[os.path.join(out_dir, f"{name}-s{seed}")], 1)
    return rows


def load(path):
    """{ablation: [rows of one seed, ...]} and {ablation: [wall seconds per seed]} from the compact log."""
    if not os.path.isfile(path):
        raise config.UserError(f"no ablation log {path}: run `python -m tools.ablations` first, or name it --metrics")
    runs, walls = {}, {}
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            r = jsonfile.loads(line, f"{path}:{n}")
            name, seed = r.pop("ablation"), r.pop("seed")
        except (jsonfile.JSONError, KeyError, AttributeError, TypeError):
            raise config.UserError(f"{path}:{n}: not a row of the ablation log; run `python -m tools.ablations` "
                                   "again") from None
        seeds = runs.setdefault(name, [])
        if seed == len(seeds):
            seeds.append([])
        elif seed != len(seeds) - 1:
            raise config.UserError(f"{path}:{n}: {name} seed {seed} out of order; run `python -m tools.ablations` "
                                   "again")
        seeds[-1].append(r)
        if "wall_s" in r:
            walls.setdefault(name, []).append(r["wall_s"])
    return runs, walls


def table(runs, walls):
    """Markdown: what each ablation changes, held-out accuracy before and after (mean ± std, per seed), the
    response length at the end and the mean clip fraction, wall time per run."""
    lines = ["| ablation | what changes | held-out acc. before | after RL (mean ± std) | per seed | response "
             "length at end | clip fraction (mean) | wall time per run |", "|---|---|---|---|---|---|---|---|"]
    for name, seed_rows in runs.items():
        evals = [[r["eval/strict"] for r in rows if "eval/strict" in r] for rows in seed_rows]
        final = [e[-1] for e in evals]
        mean = sum(final) / len(final)
        std = math.sqrt(sum((x - mean) ** 2 for x in final) / len(final))
        length = sum(rows[-1]["response_length"] for rows in seed_rows) / len(seed_rows)
        clips = [r["clip_frac"] for rows in seed_rows for r in rows if "clip_frac" in r]
        wall = walls.get(name, [])
        wall_txt = f"{sum(wall) / len(wall):.0f} s" if len(wall) == len(seed_rows) else "n/a"
        lines.append(f"| {name} | {ABLATIONS[name][0]} | {sum(e[0] for e in evals) / len(evals):.3f} | "
                     f"**{mean:.3f} ± {std:.3f}** | {', '.join(f'{x:.3f}' for x in final)} | {length:.1f} | "
                     f"{sum(clips) / len(clips):.4f} | {wall_txt} |")
    return "\n".join(lines)


def main():
    cfg = config.parse(Config)
    names = list(ABLATIONS) if cfg.ablations == "all" else [a.strip() for a in cfg.ablations.split(",") if a.strip()]
    unknown = [a for a in names if a not in ABLATIONS]
    if unknown or not names:
        raise config.UserError(f"unknown ablation(s) {unknown} in --ablations: choose from {', '.join(ABLATIONS)}")
    if not cfg.logs_only:
        def command(name, seed, run_dir):
            return [sys.executable, "-c", "import sys; from tools import ablations; "
                    "ablations.run_one(sys.argv[1], sys.argv[2:])", name, "--tiny", f"--seed={seed}",
                    f"--run_dir={run_dir}", "--overwrite", *cfg.extra.split()]
        walls = compare.run_all(cfg, names, command)
        os.makedirs(os.path.dirname(cfg.metrics) or ".", exist_ok=True)
        with open(cfg.metrics, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in compact(cfg.out_dir, names, cfg.seeds, walls))
    runs, walls = load(cfg.metrics)
    runs = {n: runs[n] for n in names if n in runs}
    if not runs:
        raise config.UserError(f"{cfg.metrics} holds none of {', '.join(names)}: run them first")
    print(table(runs, walls))
    if compare.plot(cfg, runs, cfg.figure):
        print(f"\nfigure: {cfg.figure}")


if __name__ == "__main__":
    config.run(main)
