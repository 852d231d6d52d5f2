"""
compare.py: the trainers side by side. Runs each on the tiny default for several seeds, then
draws one figure (held-out accuracy, reward, response length, entropy, clip or gate activity
against step; mean and spread over seeds) and writes one table (final accuracy mean ± std, steps to
a threshold, wall time).

    python -m tools.compare                          # every trainer x 3 seeds on the tiny default (CPU)
    python -m tools.compare --seeds=1 --algos=grpo,gspo
    python -m tools.compare --logs_only --out_dir=runs/gpu   # only read logs: <out_dir>/<algo>-s<seed>/metrics.jsonl

--logs_only reads runs made elsewhere, e.g. GPU runs of `torchrun --nproc_per_node=2 gspo.py
--run_dir=runs/gpu/gspo-s0 --seed=0`: any run dir named <algo>-s<seed> under out_dir.
Plotting needs matplotlib (`pip install matplotlib`); without it the table is still written.

What it holds: Config; run_all (every run, `jobs` at a time); load_runs, series, wall_time (reading the logs);
trust_region (clip fraction, or SAPO's gate); plot and the table (main).
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from grpo_family import config, distributed, jsonfile, loading
from tools import trainers



@dataclass
class Config:
    algos: str = ",".join(trainers.TRAINERS)  # comma-separated trainers to compare
    seeds: int = 3  # seeds 0 .. seeds-1 for every trainer
    out_dir: str = "runs/compare"  # one run dir per (trainer, seed): <out_dir>/<algo>-s<seed>
    jobs: int = 2  # trainer processes at once (each gets OMP_NUM_THREADS = cores / jobs)
    threshold: float = 0.5  # held-out accuracy for the "steps to threshold" column
    extra: str = ""  # extra flags for every trainer, space-separated (e.g. "--num_steps=20")
    logs_only: bool = False  # do not run anything; read the metrics.jsonl files already in out_dir
    figure: str = ""  # where to save the figure ("" = <out_dir>/compare.png)


# the panels: (title, how to read one metrics row); None where a trainer does not log it
def trust_region(row):
    """Clip fraction for the clipped objectives; for SAPO's gate, 1 - mean gate weight."""
    if "gate_weight_pos" in row:
        return 1.0 - 0.5 * (row["gate_weight_pos"] + row["gate_weight_neg"])
    return row.get("clip_frac")


PANELS = [("held-out greedy accuracy", lambda r: r.get("eval/strict")),
          ("reward (sampled)", lambda r: r.get("reward")),
          ("response length (tokens)", lambda r: r.get("response_length")),
          ("entropy (nats/token)", lambda r: r.get("entropy")),
          ("clip fraction (SAPO: 1 - gate weight)", trust_region),
          ("sampled accuracy", lambda r: r.get("accuracy"))]


def run_all(cfg, algos, command=None):
    """Launch every (trainer, seed) run, `jobs` at a time; returns {run_dir: wall seconds}. `command(algo, seed,
    run_dir)` gives a run's argv (default: the trainer on the tiny default, with cfg.extra)."""
    one_cpu = distributed.Dist(False, 0, 0, 1, torch.device("cpu"), True)
    loading.model_path("tiny", one_cpu)  # the tiny model built once, before the runs race to build it
    todo = [(a, s) for s in range(cfg.seeds) for a in algos]
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    running, walls = [], {}
    while todo or running:
        while todo and len(running) < cfg.jobs:
            algo, seed = todo.pop(0)
            run_dir = os.path.join(cfg.out_dir, f"{algo}-s{seed}")
            os.makedirs(run_dir, exist_ok=True)
            cmd = command(algo, seed, run_dir) if command else \
                [sys.executable, trainers.path(algo), "--tiny", f"--seed={seed}", f"--run_dir={run_dir}",
                 "--overwrite", *cfg.extra.split()]  # a fresh run each time
            log = open(os.path.join(run_dir, "stdout.log"), "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=trainers.ROOT),
                            run_dir, time.time(), log))
            print(f"started {algo} seed {seed}", flush=True)
        time.sleep(0.5)
        for job in list(running):
            proc, run_dir, t0, log = job
            if proc.poll() is None:
                continue
            running.remove(job)
            log.close()
            if proc.returncode != 0:  # stop the other children first: none is left running as an orphan
                for other, other_dir, _, other_log in running:
                    other.terminate()
                    other.wait()
                    other_log.close()
                stopped = ", ".join(os.path.basename(d) for _, d, _, _ in running) or "none"
                raise config.UserError(f"{run_dir} failed with exit code {proc.returncode} (see {run_dir}/stdout.log); "
                                       f"stopped the runs still going: {stopped}")
            walls[run_dir] = time.time() - t0
            with open(os.path.join(run_dir, "wall_time.json"), "w") as f:
                json.dump({"wall_s": walls[run_dir], "jobs": cfg.jobs, "threads": threads}, f)
            print(f"finished {run_dir} in {walls[run_dir]:.0f}s", flush=True)
    return walls


def load_runs(out_dir, algos, seeds):
    """{algo: [rows of metrics.jsonl, one list per seed]}; a missing, empty or damaged log, or one with no held-out
    evaluation, is a UserError naming it."""
    runs = {}
    for algo in algos:
        for seed in range(seeds):
            path = os.path.join(out_dir, f"{algo}-s{seed}", "metrics.jsonl")
            if not os.path.isfile(path):
                raise config.UserError(f"no log {path}: run without --logs_only, or copy the run dir there")
            rows = []
            for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                try:
                    rows.append(jsonfile.loads(line, f"{path}:{n}"))
                except jsonfile.JSONError as e:
                    raise config.UserError(f"{e}: the run's log is damaged; run it again without --logs_only") from None
                if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("step"), int):
                    raise config.UserError(f"{path}:{n}: not a metrics row (no integer 'step'); run it again")
            if not any("eval/strict" in r for r in rows):
                raise config.UserError(f"{path} holds no held-out evaluation (an empty or unfinished run): run it "
                                       "again without --logs_only")
            runs.setdefault(algo, []).append(rows)
    return runs


def series(seed_rows, get):
    """[(step, mean, std, n)] of a metric over seeds, at the steps where every seed logged it."""
    per_seed = [{r["step"]: get(r) for r in rows if get(r) is not None} for rows in seed_rows]
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    out = []
    for s in steps:
        xs = [p[s] for p in per_seed]
        mean = sum(xs) / len(xs)
        out.append((s, mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)), len(xs)))
    return out


def wall_time(out_dir, algo, seed):
    """Wall seconds of one run, from the wall_time.json that run_all wrote (None if absent)."""
    path = os.path.join(out_dir, f"{algo}-s{seed}", "wall_time.json")
    try:
        wall = jsonfile.load(path) if os.path.isfile(path) else {}
    except (OSError, jsonfile.JSONError) as e:
        raise config.UserError(f"{e}: delete it (the wall time is then n/a) or run again") from None
    if wall and not (isinstance(wall, dict) and isinstance(wall.get("wall_s"), (int, float))):
        raise config.UserError(f"{path}: no number 'wall_s' in it: delete it (the wall time is then n/a) or run again")
    return wall.get("wall_s") if wall else None


def table(cfg, runs):
    """Markdown table: final held-out accuracy mean ± std (and per seed), steps to threshold, time."""
    lines = ["| trainer | held-out acc. before | after RL (mean ± std) | per seed | "
             f"steps to {cfg.threshold:.2f} | response length at end | wall time per run |",
             "|---|---|---|---|---|---|---|"]
    for algo, seed_rows in runs.items():
        evals = [[r for r in rows if "eval/strict" in r] for rows in seed_rows]
        first = [e[0]["eval/strict"] for e in evals]
        final = [e[-1]["eval/strict"] for e in evals]
        mean = sum(final) / len(final)
        std = math.sqrt(sum((x - mean) ** 2 for x in final) / len(final))
        reach = [next((r["step"] for r in e if r["eval/strict"] >= cfg.threshold), None) for e in evals]
        hit = [x for x in reach if x is not None]
        seeds = f" ({len(hit)}/{len(reach)} seeds)" if len(hit) < len(reach) else ""
        reach_txt = f"{sum(hit) / len(hit):.0f}{seeds}" if hit else "not reached"
        lengths = [rows[-1].get("response_length") for rows in seed_rows]
        walls = [wall_time(cfg.out_dir, algo, s) for s in range(len(seed_rows))]
        wall_txt = f"{sum(walls) / len(walls):.0f} s" if all(w is not None for w in walls) else "n/a"
        lines.append(f"| {algo} | {sum(first) / len(first):.3f} | **{mean:.3f} ± {std:.3f}** | "
                     f"{', '.join(f'{x:.3f}' for x in final)} | {reach_txt} | "
                     f"{sum(lengths) / len(lengths):.1f} | {wall_txt} |")
    return "\n".join(lines)


def plot(cfg, runs, path):
    """The six-panel figure, mean line and ±1 std band over seeds; returns False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so no figure: pip install matplotlib", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    colours = plt.get_cmap("tab20").colors  # 16 trainers: no colour repeats; even ones dashed, to tell pairs apart
    for ax, (title, get) in zip(axes.flat, PANELS):
        for k, (algo, seed_rows) in enumerate(runs.items()):
            pts = series(seed_rows, get)
            if not pts:
                continue
            x, m, s = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            line, = ax.plot(x, m, marker="o" if len(x) < 8 else None, label=algo, color=colours[k % 20],
                            linestyle="--" if k % 2 else "-")
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right")  # beside the panels, not over one
    n = len(next(iter(runs.values())))
    fig.suptitle(f"tiny default, {n} seed(s): mean and ±1 std over seeds")
    fig.tight_layout(rect=(0, 0, 0.91, 1))
    fig.savefig(path, dpi=110)
    return True


def main():
    cfg = config.parse(Config)
    algos = [a.strip() for a in cfg.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in trainers.TRAINERS]
    if unknown or not algos:
        raise config.UserError(f"unknown trainer(s) {unknown} in --algos; choose from {trainers.TRAINERS}")
    if cfg.seeds < 1 or cfg.jobs < 1:
        raise config.UserError("--seeds and --jobs must be at least 1")
    if loading.holds_model(cfg.out_dir):
        raise config.UserError(f"--out_dir={cfg.out_dir} holds a model or a run, not runs named <algo>-s<seed>: "
                               "name the folder that holds them")
    t0 = time.time()
    if not cfg.logs_only:
        run_all(cfg, algos)
    runs = load_runs(cfg.out_dir, algos, cfg.seeds)
    text = table(cfg, runs)
    fig_path = cfg.figure or os.path.join(cfg.out_dir, "compare.png")
    drew = plot(cfg, runs, fig_path)
    summary = os.path.join(cfg.out_dir, "summary.md")
    with open(summary, "w") as f:
        f.write(text + "\n")
    print(text)
    wall = "" if cfg.logs_only else (f"\ntotal wall time {time.time() - t0:.0f}s for {len(algos)} trainers x "
                                     f"{cfg.seeds} seeds, {cfg.jobs} at a time")
    print(f"\ntable: {summary}" + (f"\nfigure: {fig_path}" if drew else "") + wall)


if __name__ == "__main__":
    config.run(main)
