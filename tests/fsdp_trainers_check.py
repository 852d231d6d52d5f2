"""Launched by test_fsdp.py under `torchrun --nproc_per_node=2` (gloo): each trainer named in argv[2] runs the tiny
default for two steps twice from the same start, once with DDP and once with --fsdp (extra flags: argv[3:]), in
run dirs <argv[1]>/<trainer>-{ddp,fsdp}. Rank 0 writes, per trainer, both runs' logged metrics and the largest
difference of their final weights (PPO's critic too) to <argv[1]>/report.json; test_fsdp.py asserts on them. One
process group serves all the runs (the trainers' own setup and teardown are skipped)."""
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_family import config, distributed


def metrics(run_dir):
    return {json.loads(l)["step"]: json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))}


def main():
    out, names, extra = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    d = distributed.setup()
    dist.init_process_group = lambda *a, **k: None  # the trainers' setup and teardown reuse this process group
    dist.destroy_process_group = lambda *a, **k: None
    tmp = out
    report = {}
    for name in names:
        trainer = importlib.import_module(name)
        dirs = {}
        for mode in ("ddp", "fsdp"):
            dirs[mode] = os.path.join(tmp, f"{name}-{mode}")
            sys.argv = [f"{name}.py", "--tiny", "--num_steps=2", "--batch_prompts=4", "--eval_problems=8",
                        "--eval_every=0", f"--run_dir={dirs[mode]}", f"--fsdp={mode == 'fsdp'}", *extra]
            trainer.main()  # ends with distributed.check_replicas: both ranks agree on the (whole) weights and steps
        if d.master_process:
            a, b = (load_file(os.path.join(dirs[m], "ckpt-000002", "model.safetensors")) for m in ("ddp", "fsdp"))
            assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
            diff = max((a[k] - b[k]).abs().max().item() for k in a)
            a, b = (torch.load(os.path.join(dirs[m], "ckpt-000002", "trainer_state.pt"), weights_only=True)["extra"]
                    for m in ("ddp", "fsdp"))
            if "critic" in a:  # PPO: the critic is a second network, trained and saved beside the policy
                diff = max([diff] + [(a["critic"][k] - b["critic"][k]).abs().max().item() for k in a["critic"]])
            report[name] = {"ddp": metrics(dirs["ddp"]), "fsdp": metrics(dirs["fsdp"]), "weight_diff": diff}
            print(f"{name}: --fsdp run vs DDP run, largest weight difference {report[name]['weight_diff']:.2e}",
                  flush=True)
    if d.master_process:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    config.run(main)
