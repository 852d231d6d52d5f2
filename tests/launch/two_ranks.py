"""
Launched by tests/test_ddp.py under `torchrun --nproc_per_node=2` (gloo), one process group for every run (the
trainers' own setup and teardown reuse it):
1. every trainer's tiny default for two steps on two ranks, sampling for real, with the flags of VARIANTS: the run
   ends with distributed.check_replicas (every rank holds the same weights and took the same optimizer steps);
2. every trainer but dpo.py (it refuses --fsdp) twice more from the same start, once under DDP and once under
   --fsdp, on written-out completions (the same on any build of the tiny model, a gradient in every step), or
   sampling for real (SAMPLING = sampled: the decoder's copy of the sharded weights samples what DDP's does).
Rank 0 writes <argv[1]>/report.json: {trainer: {"smoke": metrics, "ddp": metrics, "fsdp": metrics,
"weight_diff": the largest difference of the two runs' final weights (PPO's critic too)}}, metrics by step.

    argv: OUT [trainer,trainer,... [written|sampled [extra flags for the --fsdp pair]]]
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import constructed_sampler  # noqa: E402
from grpo_family import config, distributed, rollout  # noqa: E402
from tools import trainers  # noqa: E402

FAST = ["--tiny", "--num_steps=2", "--batch_prompts=4", "--group_size=4", "--eval_problems=4", "--eval_every=0"]
# each trainer's two-rank run exercises an option that only shows with two ranks, or its default
VARIANTS = {"dapo": ["--overlong_filter", "--beta=0.04"], "gspo": ["--gspo_token", "--beta=0.04"],
            "gfpo": ["--group_size=8", "--batch_prompts=8", "--adaptive_difficulty", "--filter_metric=efficiency"],
            "gtpo": ["--ent_rule=percentile", "--ent_percentile=75", "--gspo_token"]}
PAIR = {"gfpo": ["--keep=2"]}  # the --fsdp and DDP pair at G = 4: GFPO trains its 2 shortest


def metrics(run_dir):
    return {json.loads(l)["step"]: json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))}


def train(trainer, name, run_dir, flags):
    sys.argv = [f"{name}.py", *FAST, f"--run_dir={run_dir}", *flags]
    trainer.main()  # ends with distributed.check_replicas
    return metrics(run_dir)


def weight_diff(dirs):
    """The largest difference of two runs' final weights, PPO's critic (saved in the trainer state) included."""
    a, b = (load_file(os.path.join(x, "ckpt-000002", "model.safetensors")) for x in dirs)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    a, b = (torch.load(os.path.join(x, "ckpt-000002", "trainer_state.pt"), weights_only=True)["extra"] for x in dirs)
    if "critic" in a:
        diff = max([diff] + [(a["critic"][k] - b["critic"][k]).abs().max().item() for k in a["critic"]])
    return diff


def main():
    out = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else trainers.TRAINERS
    written = sys.argv[3] != "sampled" if len(sys.argv) > 3 else True
    extra = sys.argv[4:]
    d = distributed.setup()
    dist.init_process_group = lambda *a, **k: None  # the trainers' setup and teardown reuse this process group
    dist.destroy_process_group = lambda *a, **k: None
    sample, report = rollout.sample, {}
    for name in names:
        trainer = trainers.load(name)
        report[name] = {"smoke": train(trainer, name, os.path.join(out, f"{name}-smoke"), VARIANTS.get(name, []))}
        if name == "dpo":
            continue
        if written:  # written-out completions: a gradient in every step
            rollout.sample = constructed_sampler()
        try:
            dirs = [os.path.join(out, f"{name}-{mode}") for mode in ("ddp", "fsdp")]
            for mode, run_dir in zip(("ddp", "fsdp"), dirs):
                flags = [f"--fsdp={mode == 'fsdp'}", *PAIR.get(name, []), *extra]
                report[name][mode] = train(trainer, name, run_dir, flags)
        finally:
            rollout.sample = sample
        if d.master_process:
            report[name]["weight_diff"] = weight_diff(dirs)
            print(f"{name}: --fsdp vs DDP, largest weight difference {report[name]['weight_diff']:.2e}", flush=True)
    if d.master_process:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    config.run(main)
