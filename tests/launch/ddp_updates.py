"""
Launched by tests/test_ddp.py under `torchrun --nproc_per_node=2` (gloo): for every trainer, its own step (main(),
tools/harness.py) on the same global batch of written-out completions, once as a single process holding the
whole batch and once as two DDP ranks holding half each, and the gradient each optimizer step is given (before
clipping) compared. The batch gives the ranks shares of very different token counts, all-equal groups (DAPO's
filter drops them: one rank's own groups all of them) and micro-batches of 2, so the loss normalisers, the
world-size factors, the no_sync accumulation and the loss going through the wrapped model all show. Rank 0 writes
<argv[1]>: {trainer: {"steps": n, "ddp_vs_single": largest relative difference, "size": the smallest step's
largest gradient entry, "metrics": what the DDP step logged}}.

    argv: OUT [trainer,trainer,...]
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import constructed_sampler, single_process  # noqa: E402
from grpo_family import config, distributed, loading, logs, rollout, tiny  # noqa: E402
from tools import harness, trainers  # noqa: E402

# the flags of the step: the tiny default, 4 prompts x G = 4 over both ranks, one mini-batch (its shuffle then
# cannot differ between the runs) in micro-batches of 2; GFPO trains its 2 shortest of 4
FLAGS = ["--tiny", "--batch_prompts=4", "--group_size=4", "--num_minibatches=1", "--micro_batch_size=2",
         "--max_new_tokens=32", "--eval_problems=1"]
EXTRA = {"gfpo": ["--keep=2"]}


def problems():
    """12 problems; the prompt order (loading.prompt_indices, seed 0) gives step 0 rows 8, 0, 5, 9: rank 0 holds 8
    and 5, rank 1 holds 0 and 9, whose completions are written all equal (one short wrong answer each). So rank 1
    holds far fewer tokens than rank 0, no advantage, and no group DAPO keeps: its next sampling round (rows 7, 4,
    2, 10) fills the batch, and DAPO's ranks share the kept groups of both."""
    rows = tiny.dataset("train")[:12]
    assert loading.prompt_indices(len(rows), 0, 4, 0) == [8, 0, 5, 9], "the prompt order changed: pick rows again"
    return rows, {rows[0]["question"], rows[9]["question"]}


class Recorder(harness.NullLogger):
    """logs.Logger's interface, keeping the step's metrics."""
    metrics = {}

    def log(self, step, metrics):
        Recorder.metrics = dict(metrics)


def gradients(name, d, tok):
    """The gradients (flattened, float64) each clip_grad_norm_ call of the trainer's one step was given, and the
    metrics it logged."""
    rows, flat = problems()
    step = harness.Step(name, FLAGS + EXTRA.get(name, []), d, rows, tok)
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        seen.append(torch.cat([p.grad.detach().double().flatten() for p in parameters if p.grad is not None]))
        return clip(parameters, *args, **kwargs)

    step.replace(rollout, "sample", constructed_sampler(flat))
    step.replace(torch.nn.utils, "clip_grad_norm_", recording_clip)
    step.replace(distributed, "cleanup", lambda dd: None)  # the launch's process group serves every run
    step.replace(logs, "Logger", Recorder)
    step.replace(loading, "model_path", lambda name_, dd: tiny.ensure_model(dd, log=lambda *a: None))
    harness.quiet(step.run)
    return seen, Recorder.metrics


def main():
    out = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else trainers.TRAINERS
    d = distributed.setup()
    path = tiny.ensure_model(d, log=lambda *a: None)
    tok = loading.tokenizer(path)
    report = {}
    for name in names:
        single, _ = gradients(name, single_process(), tok)  # every rank computes it: the whole batch, one process
        ddp, metrics = gradients(name, d, tok)
        assert len(single) == len(ddp) > 0, (name, len(single), len(ddp))
        worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(ddp, single))
        report[name] = {"steps": len(single), "ddp_vs_single": worst,
                        "size": min(g.abs().max().item() for g in single), "metrics": metrics}
        if d.master_process:
            print(f"{name}: DDP gradient vs single process, largest relative difference {worst:.2e}", flush=True)
    if d.master_process:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    config.run(main)
