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

What it holds: Config; check (the flags and --out_dir, before anything runs); run_flags, run_all, start, finish,
stop (every run, `jobs` at a time, none left running); load_runs, metrics_row, evaluated, series, wall_time (reading the logs);
trust_region (clip fraction, or SAPO's gate); plot and table (the figure and the table); main.
"""
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from grpo_family import config, distributed, jsonfile, loading
from tools import output, trainers


@dataclass
class Config:
    algos: str = ",".join(trainers.TRAINERS)  # comma-separated trainers to compare
    seeds: int = 3  # seeds 0 .. seeds-1 for every trainer, in [1, inf)
    out_dir: str = "runs/compare"  # one run dir per (trainer, seed): <out_dir>/<algo>-s<seed>
    jobs: int = 2  # trainer processes at once (each gets OMP_NUM_THREADS = cores / jobs), in [1, inf)
    threshold: float = 0.5  # held-out accuracy for the "steps to threshold" column, in [0, 1]
    extra: str = ""  # extra flags for every trainer, space-separated (e.g. "--num_steps=20"); not those compare sets
    logs_only: bool = False  # do not run anything; read the metrics.jsonl files already in out_dir
    figure: str = ""  # where to save the figure, a .png, .pdf or .svg ("" = <out_dir>/compare.png)


# the panels: (title, how to read one metrics row); None where a trainer does not log it
def trust_region(row):
    """Clip fraction for the clipped objectives; for SAPO's gate, 1 - mean gate weight."""
    if "gate_weight_pos" in row:
        pos, neg = row["gate_weight_pos"], row.get("gate_weight_neg")
        return None if pos is None or neg is None else 1.0 - 0.5 * (pos + neg)
    return row.get("clip_frac")


PANELS = [("held-out greedy accuracy", lambda r: r.get("eval/strict")),
          ("reward (sampled)", lambda r: r.get("reward")),
          ("response length (tokens)", lambda r: r.get("response_length")),
          ("entropy (nats/token)", lambda r: r.get("entropy")),
          ("clip fraction (SAPO: 1 - gate weight)", trust_region),
          ("sampled accuracy", lambda r: r.get("accuracy"))]


def run_flags(seed, run_dir):
    """The flags compare gives each run: what makes the runs of one trainer differ (its seed), and where each goes."""
    return ["--tiny", f"--seed={seed}", f"--run_dir={run_dir}", "--overwrite"]  # a fresh run each time


def run_all(cfg, algos, command=None):
    """Launch every (trainer, seed) run, `jobs` at a time; returns {run_dir: wall seconds}. `command(algo, seed,
    run_dir)` gives a run's argv (default: the trainer with run_flags and cfg.extra). Whatever stops it (a failed
    run, a file that cannot be written, Ctrl-C), no run is left going."""
    one_cpu = distributed.Dist(False, 0, 0, 1, torch.device("cpu"), True)
    loading.model_path("tiny", one_cpu)  # the tiny model built once, before the runs race to build it
    todo = [(a, s) for s in range(cfg.seeds) for a in algos]
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    running, walls = [], {}
    try:
        while todo or running:
            while todo and len(running) < cfg.jobs:
                running.append(start(cfg, *todo.pop(0), command, env))
            time.sleep(0.5)
            for job in [j for j in running if j[0].poll() is not None]:
                running.remove(job)
                walls[job[1]] = finish(cfg, job, threads, running)
    finally:
        stop(running)
    return walls


def start(cfg, algo, seed, command, env):
    """One run started: (process, run dir, start time, its stdout.log)."""
    run_dir = os.path.join(cfg.out_dir, f"{algo}-s{seed}")
    cmd = command(algo, seed, run_dir) if command else \
        [sys.executable, trainers.path(algo), *run_flags(seed, run_dir), *cfg.extra.split()]
    try:
        os.makedirs(run_dir, exist_ok=True)
        log = open(os.path.join(run_dir, "stdout.log"), "w")
    except OSError as e:  # a file where the run dir goes, a full disk
        raise config.UserError(f"cannot start the run in {run_dir}: {e.strerror or e} ({e.filename}); move it away, "
                               "free disk space or pick another --out_dir") from None
    print(f"started {algo} seed {seed}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=trainers.ROOT), run_dir, \
        time.time(), log


def finish(cfg, job, threads, running):
    """A run that ended: its wall seconds, written to its wall_time.json; a failed run is a UserError naming the runs
    still going (run_all stops them)."""
    proc, run_dir, t0, log = job
    log.close()
    if proc.returncode != 0:
        stopped = ", ".join(os.path.basename(d) for _, d, _, _ in running) or "none"
        raise config.UserError(f"{run_dir} failed with exit code {proc.returncode} (see {run_dir}/stdout.log); "
                               f"stopped the runs still going: {stopped}")
    wall = time.time() - t0
    output.write(os.path.join(run_dir, "wall_time.json"), json.dumps({"wall_s": wall, "jobs": cfg.jobs,
                                                                     "threads": threads}), "free disk space")
    print(f"finished {run_dir} in {wall:.0f}s", flush=True)
    return wall


def stop(running):
    """End the runs still going (each by its process) and close their logs: none is left as an orphan."""
    for proc, _, _, log in running:
        proc.terminate()
        proc.wait()
        log.close()


def load_runs(out_dir, algos, seeds):
    """{algo: [rows of metrics.jsonl, one list per seed]}; a missing, empty or damaged log, or one with no held-out
    evaluation, is a UserError naming it."""
    runs = {}
    for algo in algos:
        for seed in range(seeds):
            path = os.path.join(out_dir, f"{algo}-s{seed}", "metrics.jsonl")
            if not os.path.isfile(path):
                raise config.UserError(f"no log {path}: run without --logs_only, or copy the run dir there")
            with open(path, encoding="utf-8", errors="replace") as f:
                rows = [metrics_row(line, f"{path}:{n}") for n, line in enumerate(f, 1)]
            if not any(evaluated(r) for r in rows):
                raise config.UserError(f"{path} holds no held-out evaluation (an empty or unfinished run): run it "
                                       "again without --logs_only")
            runs.setdefault(algo, []).append(rows)
    return runs


def metrics_row(line, where):
    """One line of a trainer's metrics.jsonl as the trainers write it: an integer 'step', and numbers or null (nothing
    counted); anything else (a line cut short, a value of another kind) is a UserError naming the line."""
    fix = "the run's log is damaged or unfinished; run it again without --logs_only"
    try:
        row = jsonfile.loads(line, where)
    except jsonfile.JSONError as e:
        raise config.UserError(f"{e}: {fix}") from None
    if not isinstance(row, dict) or type(row.get("step")) is not int:
        raise config.UserError(f"{where}: not a metrics row (no integer 'step'); {fix}")
    bad = next((k for k, v in row.items() if v is not None and type(v) not in (int, float)), None)
    if bad is not None:
        raise config.UserError(f"{where}: {bad!r} is {row[bad]!r}, not a number or null; {fix}")
    return row


def evaluated(row):
    """A row that holds a held-out accuracy (a number: null is an evaluation that counted nothing)."""
    return row.get("eval/strict") is not None


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
        evals = [[r for r in rows if evaluated(r)] for rows in seed_rows]
        first = [e[0]["eval/strict"] for e in evals]
        final = [e[-1]["eval/strict"] for e in evals]
        mean = sum(final) / len(final)
        std = math.sqrt(sum((x - mean) ** 2 for x in final) / len(final))
        reach = [next((r["step"] for r in e if r["eval/strict"] >= cfg.threshold), None) for e in evals]
        hit = [x for x in reach if x is not None]
        seeds = f" ({len(hit)}/{len(reach)} seeds)" if len(hit) < len(reach) else ""
        reach_txt = f"{sum(hit) / len(hit):.0f}{seeds}" if hit else "not reached"
        lengths = [next((r["response_length"] for r in reversed(rows) if r.get("response_length") is not None), None)
                   for rows in seed_rows]  # each seed's last logged length
        length_txt = f"{sum(lengths) / len(lengths):.1f}" if None not in lengths else "n/a"
        walls = [wall_time(cfg.out_dir, algo, s) for s in range(len(seed_rows))]
        wall_txt = f"{sum(walls) / len(walls):.0f} s" if all(w is not None for w in walls) else "n/a"
        lines.append(f"| {algo} | {sum(first) / len(first):.3f} | **{mean:.3f} ± {std:.3f}** | "
                     f"{', '.join(f'{x:.3f}' for x in final)} | {reach_txt} | {length_txt} | {wall_txt} |")
    return "\n".join(lines)


def plot(cfg, runs, path):
    """The six-panel figure, mean line and ±1 std band over seeds; returns False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")  # a note, not an error
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
    image = io.BytesIO()
    fig.savefig(image, format=os.path.splitext(path)[1][1:], dpi=110)
    output.write(path, image.getvalue(), "free disk space or pick another --figure")
    return True


def check(cfg):
    """The trainers named, --extra and the output paths, before anything runs; returns the trainers."""
    algos = [a.strip() for a in cfg.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in trainers.TRAINERS]
    if unknown or not algos:
        raise config.UserError(f"unknown trainer(s) {unknown} in --algos; choose from {trainers.TRAINERS}")
    if len(set(algos)) < len(algos):
        raise config.UserError(f"--algos={cfg.algos} names a trainer twice: its runs would share their run dirs")
    ours = {f.split("=")[0] for f in run_flags(0, "") + ["--resume"]}  # --resume: every seed continuing one run
    taken = [f for f in cfg.extra.split() if f.split("=")[0] in ours]
    if taken:
        raise config.UserError(f"--extra={cfg.extra!r} sets {', '.join(taken)}: compare sets each run's seed and run "
                               f"dir itself, so every seed would be the same run; drop it ({', '.join(sorted(ours))} "
                               "are compare's)")
    if loading.holds_model(cfg.out_dir):
        raise config.UserError(f"--out_dir={cfg.out_dir} holds a model or a run, not runs named <algo>-s<seed>: "
                               "name the folder that holds them")
    if cfg.logs_only and not os.path.isdir(cfg.out_dir):
        raise config.UserError(f"--out_dir={cfg.out_dir} is not a folder of runs named <algo>-s<seed>: name the "
                               "folder that holds them, or run without --logs_only")
    output.writable_dir(cfg.out_dir, f"--out_dir={cfg.out_dir}")  # summary.md, and the runs
    if cfg.figure:
        if os.path.splitext(cfg.figure)[1] not in (".png", ".pdf", ".svg"):
            raise config.UserError(f"--figure={cfg.figure}: give a path ending in .png, .pdf or .svg")
        folder = os.path.dirname(os.path.abspath(cfg.figure))
        output.writable_dir(folder, f"--figure={cfg.figure}: its folder {folder}")
    return algos


def main():
    cfg = config.parse(Config)
    algos = check(cfg)
    t0 = time.time()
    if not cfg.logs_only:
        run_all(cfg, algos)
    runs = load_runs(cfg.out_dir, algos, cfg.seeds)
    text = table(cfg, runs)
    summary = os.path.join(cfg.out_dir, "summary.md")
    output.write(summary, text + "\n", "free disk space or pick another --out_dir")
    print(text)
    fig_path = cfg.figure or os.path.join(cfg.out_dir, "compare.png")
    drew = plot(cfg, runs, fig_path)
    wall = "" if cfg.logs_only else (f"\ntotal wall time {time.time() - t0:.0f}s for {len(algos)} trainers x "
                                     f"{cfg.seeds} seeds, {cfg.jobs} at a time")
    print(f"\ntable: {summary}" + (f"\nfigure: {fig_path}" if drew else "") + wall)


if __name__ == "__main__":
    config.run(main)
