"""
logs.py: what a run reports. Sums over micro-batches and ranks, the progress bar, metrics.jsonl, optional wandb.

    accumulate      add (total, count) into a step's sums
    Metrics, reduce the sums averaged over every rank: the same {name: mean} on each; .diverged names non-finite ones
    progress        the progress bar's postfix: reward, sampled accuracy, length, clip fraction
    versions        python, torch, transformers (and peft with --lora_rank): what a problem report needs
    Logger          metrics.jsonl (one line per step) and config.json; wandb if asked; stops a diverged run
"""
import dataclasses
import importlib.util
import json
import math
import os
import sys

import torch

from grpo_family import distributed, fsdp
from grpo_family.config import UserError


def accumulate(sums, key, total, count):
    """Add (total, count) into sums[key], for metrics averaged later by reduce."""
    old = sums.get(key, (0.0, 0.0))
    sums[key] = (old[0] + float(fsdp.full(total)), old[1] + float(count))  # a gradient norm under --fsdp: a DTensor


class Metrics(dict):
    """{name: mean}, NaN where nothing was counted; .diverged: the losses and gradient norms that are not finite."""
    diverged = ()


def reduce(sums, d):
    """Average a dict of {name: (sum, count)} over all ranks; returns Metrics {name: mean}, the same on every rank."""
    names = sorted(sums)
    t = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=torch.float64, device=d.device)
    t = distributed.all_reduce_sum(t, d).cpu()
    m = Metrics({k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(names)})
    m.diverged = [k for i, k in enumerate(names) if k.endswith(("loss", "grad_norm")) and t[i, 1] > 0
                  and not math.isfinite(m[k])]
    return m


def progress(metrics):
    """The progress bar's postfix: reward, sampled accuracy, length, and the clip fraction where there is one."""
    show = [("reward", "reward", "{:.3f}"), ("acc", "accuracy", "{:.3f}"), ("len", "response_length", "{:.0f}"),
            ("clip", "clip_frac", "{:.3f}")]
    return {label: fmt.format(metrics[key]) for label, key, fmt in show if key in metrics}


def versions(cfg=None):
    """python, torch, transformers and, when --lora_rank uses it, peft: what a problem report needs."""
    import transformers
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    return {**v, "peft": __import__("peft").__version__} if getattr(cfg, "lora_rank", 0) else v


class Logger:
    """Writes one JSON line of metrics per step to run_dir/metrics.jsonl (and wandb if asked); prints the versions
    once and keeps them in config.json."""

    def __init__(self, run_dir, cfg, master, wandb_project=""):
        self.master, self.wandb, self.lr = master, None, cfg.lr
        if not master:
            return
        print("versions:", json.dumps(v := versions(cfg)), flush=True)
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not getattr(cfg, "resume", ""):  # a fresh run starts a fresh log; a resumed one appends
            open(self.path, "w").close()
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "versions": v}, f, indent=2)
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                raise UserError("--wandb_project was given but wandb is not installed: pip install wandb")
            self.wandb = __import__("wandb").init(project=wandb_project, config=dataclasses.asdict(cfg))

    def log(self, step, metrics):
        """Append {'step': step, **metrics} to metrics.jsonl (master process only); NaN (nothing counted) as null.
        A loss or gradient norm that is not finite stops the run on every rank (they hold the same reduced metrics)
        before this step is logged or saved."""
        distributed.note_step(step)
        for k in getattr(metrics, "diverged", ()):
            raise UserError(f"step {step}: {k} is {metrics[k]} (not finite): the update diverged, most often from too "
                            f"high a learning rate (--lr={self.lr}); this step was neither logged nor saved")
        if not self.master:
            return
        metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as e:  # a full or read-only disk: this step is not logged (nor saved), and the run stops
            raise UserError(f"step {step}: cannot append to {self.path}: {e.strerror or e}; free disk space or make "
                            f"it writable, then --resume from {os.path.dirname(self.path)}") from None
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
