"""
memory.py: will it fit? A trainer's own training step, run once on fake tensors (shapes and dtypes, no data) at
the real model's shape: the peak memory per GPU, what holds it, and the FLOPs and predicted time of each phase,
on a CPU, in under a minute. Everything it prints is predicted.

    python -m tools.memory grpo                          # Qwen2.5-1.5B-Instruct at grpo.py's defaults, one GPU
    python -m tools.memory gspo --gpus=2 --lora_rank=16  # any --key=value the trainer takes; --gpus: DDP over N
    python -m tools.memory all --gpus=2                  # every trainer, one line each
    python -m tools.memory table                         # README's table: every trainer, full and LoRA, 1 and 2 GPUs
    python -m tools.memory grpo --device=cpu --shape=tiny    # the CPU path (fp32, no autocast): what tests measure
    python -m tools.memory --compare=steps.jsonl         # the GPU check: predicted beside max_memory_allocated

What it holds: predicted_times (each phase's time on a few GPUs, from the FLOPs and bytes), report (the breakdown as
printed), table (README's table), compare and compared_row (the GPU check's measured peaks beside the prediction),
options (the command line read and checked), main. The step
itself is tools/prediction.py's Prediction; the counting, tools/tracker.py's Tracker.

How. The trainer's main() runs for one step (tools/harness.py) under a FakeTensorMode (tools/tracker.py) that
counts every storage an op returns until it is freed (bytes rounded up to 512, as CUDA's caching allocator rounds),
the high-water mark and what was live at it, each storage labelled by what it holds, and the FLOPs of every matmul
and attention (torch.utils.flop_counter's formulas). The plumbing is stubbed: the model is built at the chosen
shape, every prompt is --prompt_len tokens (GSM8K's longest by default), EOS is never drawn (every completion runs
to max_new_tokens), checkpoints, logging and the held-out evaluation are skipped. A value read back
(loss.item(), `.any()`) reads 1 unless the tensor was made from a known number; a data-dependent size (nonzero) is
its largest. CUDA's path runs on
fake CPU tensors (distributed.cuda_numerics answers yes: bf16 reference, LoRA base and decoder copies, bf16
autocast; AdamW's foreach kernels; decode windows of 128 as the CUDA graphs take them).

Two shortcuts keep a 1.5B step under a minute, both exact for what is predicted: a decode step reruns only for a
new attention window, the others allocate their output and add the FLOPs of their window; and a micro-batch whose
shapes, grad mode, gradient and optimizer state were seen before (or which the next mini-batch's dominates)
returns fresh outputs of the same shapes and adds the FLOPs the real one counted: accumulating into an existing
gradient allocates nothing that lasts. Not modelled: --fsdp (docs/fsdp.md), the CUDA context and fragmentation,
library workspaces, the held-out evaluation. Method and validation: docs/memory.md.
"""
import sys
import time

from grpo_family import config, jsonfile
from tools import harness, trainers
from tools.prediction import SHAPES, run_step

GIB = 2 ** 30
# dense bf16 tensor-core peak (FLOP/s), memory bandwidth (bytes/s) and nominal memory (GB): the vendors' datasheets
GPUS = {"A100-40GB": (312e12, 1.555e12, 40), "A100-80GB": (312e12, 2.039e12, 80),
        "H100-80GB": (989e12, 3.35e12, 80), "RTX 4090 (24 GB)": (165e12, 1.008e12, 24)}
MFU, BW = 0.4, 0.6  # assumed: fraction of peak FLOP/s the forward/backward reach, and of bandwidth a decode step does
CATEGORIES = ["weights", "critic (PPO)", "gradients", "DDP gradient buckets", "optimizer state", "reference model",
              "decoder weight copies", "KV cache", "rollout: logits and sampling", "rollout batch and log-probs",
              "activations", "log-prob chunks", "other"]


def predicted_times(p):
    """{gpu: (rollout, log-probs, update) seconds}: matmuls at MFU of the GPU's bf16 peak; each decode step at the
    slower of its FLOPs at MFU and its bytes (weight copies, the window's KV cache) at BW of the memory bandwidth."""
    decode_flops = sum(f for f, _ in p.decode)
    out = {}
    for gpu, (peak, bw, _) in GPUS.items():
        decode = sum(max(f / (peak * MFU), b / (bw * BW)) for f, b in p.decode)
        out[gpu] = ((p.flops["rollout"] - decode_flops) / (peak * MFU) + decode,
                    p.flops["log-probs"] / (peak * MFU), (p.flops["update"] + p.flops["setup"]) / (peak * MFU))
    return out


def report(tr):
    """The breakdown for one prediction, as printed."""
    c = tr.cfg
    gib = lambda n: f"{n / GIB:6.2f} GiB" if tr.peak > GIB else f"{n / 2**20:6.1f} MiB"  # noqa: E731
    rows = c.batch_prompts // tr.gpus * c.group_size
    what = f"LoRA rank {c.lora_rank}, {tr.trainable:,} trained" if c.lora_rank else "all trained"
    lines = [f"{tr.name}.py on the {tr.shape} shape ({tr.params:,} parameters, {what}), {tr.gpus} GPU"
             f"{'s (DDP)' if tr.gpus > 1 else ''}, {'CUDA' if tr.cuda else 'CPU'} path: PREDICTED",
             f"per GPU: {rows} completions of {tr.prompt_len} + {c.max_new_tokens} tokens, micro-batches of "
             f"{c.micro_batch_size}, gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}, "
             f"beta {getattr(c, 'beta', 0)}, {'fast' if c.fast_rollout else 'generate()'} rollout",
             f"peak memory {gib(tr.peak).strip()} per GPU (in the {tr.peak_phase}); live at the peak:"]
    brk = tr.breakdown()
    lines += [f"  {k:<30} {gib(brk[k])}" for k in CATEGORIES if brk.get(k)]
    lines.append("peak of each phase: " + ", ".join(f"{p} {gib(tr.phase_peak[p]).strip()}"
                                                    for p in ("rollout", "log-probs", "update") if p in tr.phase_peak))
    lines.append(f"FLOPs per GPU: rollout {tr.flops['rollout'] / 1e12:.1f} T ({len(tr.decode)} decode steps), "
                 f"log-probs {tr.flops['log-probs'] / 1e12:.1f} T, update {tr.flops['update'] / 1e12:.1f} T")
    lines.append(f"predicted step time (matmuls at {MFU:.0%} of bf16 peak, decode at {BW:.0%} of memory bandwidth; "
                 "fits: peak + 1 GiB of CUDA context within memory):")
    lines.append(f"  {'GPU':<18} {'memory':>7} {'fits':>5} {'rollout':>8} {'log-probs':>10} {'update':>8} {'step':>8}")
    for gpu, (r, lp, up) in predicted_times(tr).items():
        mem = GPUS[gpu][2]
        lines.append(f"  {gpu:<18} {mem:>4} GB {'yes' if tr.peak / GIB + 1 <= mem else 'no':>5} {r:>7.1f}s "
                     f"{lp:>9.1f}s {up:>7.1f}s {r + lp + up:>7.1f}s")
    return "\n".join(lines)


def table(shape, prompt_len, names=trainers.TRAINERS, rank=16):
    """README's table: every trainer at its defaults, full fine-tuning and LoRA, on 1 and 2 GPUs (markdown)."""
    head = ["trainer", "full, 1 GPU", "full, 2 GPUs", f"LoRA r{rank}, 1 GPU", f"LoRA r{rank}, 2 GPUs",
            "H100 step, full, 1 GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells, h100 = [], ""
        for lora_flags in ([], [f"--lora_rank={rank}"]):
            for gpus in (1, 2):
                tr = harness.quiet(run_step, name, lora_flags, shape, gpus, True, prompt_len)
                cells.append(f"{tr.peak / GIB:.1f} GiB ({tr.peak_phase})")
                if not lora_flags and gpus == 1:
                    h100 = f"{sum(predicted_times(tr)['H100-80GB']):.1f} s"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {h100} |")
    return "\n".join(lines)


def compared_row(row, where):
    """True for a row of the GPU check's steps.jsonl to compare: one of the four memory layouts with a measured peak.
    A row that is not as tests/test_gpu.py writes it is a UserError naming its line."""
    ok = isinstance(row, dict) and isinstance(row.get("trainer"), str) and \
        (row.get("peak_gib") is None or type(row.get("peak_gib")) in (int, float)) and \
        isinstance(row.get("settings"), list) and all(isinstance(f, str) for f in row["settings"])
    if not ok:
        raise config.UserError(f"{where}: not a step of the GPU check (a 'trainer', a number 'peak_gib' or null, a list "
                               "of 'settings'); give the steps.jsonl tools/gpu_check.sh writes")
    return row["peak_gib"] is not None and row["trainer"] in ("grpo", "grpo+lora", "ppo", "dpo")


def compare(path, shape, prompt_len):
    """The GPU check's steps (tests/test_gpu.py's JSON lines): each measured peak beside this prediction of it."""
    try:
        rows = [jsonfile.loads(line, f"{path}:{n}") for n, line in enumerate(open(path, encoding="utf-8"), 1)
                if line.strip()]
    except (OSError, ValueError) as e:  # jsonfile.JSONError and UnicodeDecodeError are ValueErrors
        raise config.UserError(f"--compare={path}: cannot read it as JSON lines ({type(e).__name__}: {e}); give "
                               "the steps.jsonl tools/gpu_check.sh writes") from None
    for n, row in enumerate(rows, 1):  # the four memory layouts (every other trainer is grpo's with another loss)
        if not compared_row(row, f"{path}:{n}"):
            continue
        name = row["trainer"].partition("+")[0]
        flags = [f for f in row["settings"] if not f.startswith(("--model=", "--run_dir="))]
        tr = harness.quiet(run_step, name, flags, shape, 1, True, prompt_len)
        print(f"{row['trainer']:<12} predicted {tr.peak / GIB:6.2f} GiB ({tr.peak_phase}), measured "
              f"{row['peak_gib']:6.2f} GiB (torch.cuda.max_memory_allocated, {row.get('device')}), "
              f"measured/predicted {row['peak_gib'] * GIB / tr.peak:.3f}")
    print(f"(prompts taken as {prompt_len} tokens; the measured peak also holds what the test process kept "
          "allocated beside the step, e.g. its fp32 copy of the model)")


def options(args, opts):
    """(what to predict, the trainer's flags) from the command line, memory's own options set in `opts`; a bad value,
    or an option the command would ignore, is a UserError. --gpus is checked by the trainer's own rule (a batch that
    splits over the processes) when its step is built."""
    what, flags, given = [a for a in args if not a.startswith("--")], [], set()
    for a in args:
        key, eq, value = a[2:].partition("=")
        if a.startswith("--") and key in opts:
            if not value:
                raise config.UserError(f"--{key} needs a value: --{key}=... (see python -m tools.memory --help)")
            opts[key] = value
            given.add(key)
        elif a.startswith("--"):
            flags.append(a)
    if opts["shape"] not in SHAPES:
        raise config.UserError(f"--shape={opts['shape']} is not known: give one of {', '.join(SHAPES)}")
    if opts["device"] not in ("cuda", "cpu"):
        raise config.UserError(f"--device={opts['device']}: give cuda (the GPU's path) or cpu (fp32, no autocast)")
    for key in ("gpus", "prompt_len"):
        if opts[key] and not (opts[key].isdigit() and int(opts[key]) > 0):
            raise config.UserError(f"--{key}={opts[key]} must be a whole number of at least 1")
    ignored = {f"--{k}" for k in {"gpus", "device"} & given} | set(flags[:1]) \
        if what[:1] == ["table"] or opts["compare"] else set()
    if ignored:  # the table sets its own GPUs, device and flags; --compare takes each step's from its file
        raise config.UserError(f"{'table' if what[:1] == ['table'] else '--compare'} takes neither --gpus, --device "
                               f"nor a trainer's flags (got {', '.join(sorted(ignored))}): drop them")
    return what, flags


def main():
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:  # memory's own usage; a trainer's flags: python <trainer>.py --help
        return print(__doc__.strip())
    opts = dict(gpus="1", shape="qwen2.5-1.5b", device="cuda", prompt_len="", compare="")  # memory's own options
    what, flags = options(args, opts)
    shape, gpus, cuda = opts["shape"], int(opts["gpus"]), opts["device"] == "cuda"
    # the longest prompt: of GSM8K's train split in Qwen2.5's tokens (README), of the tiny task in its own tokens,
    # and (--compare) of the tiny task in Qwen2.5's tokens, which the GPU check's steps train on
    prompt_len = int(opts["prompt_len"] or (29 if opts["compare"] else 77 if shape == "tiny" else 248))
    if opts["compare"]:
        return compare(opts["compare"], shape, prompt_len)
    if what[:1] == ["table"] and set(what[1:]) <= set(trainers.TRAINERS):  # table [trainer ...]: those rows only
        return print(table(shape, prompt_len, what[1:] or trainers.TRAINERS))
    if len(what) != 1 or what[0] not in trainers.TRAINERS + ["all"]:
        raise config.UserError(f"give one trainer ({', '.join(trainers.TRAINERS)}), `all` or `table [trainer ...]` "
                               f"(got {' '.join(what) or 'nothing'}); e.g. python -m tools.memory grpo --gpus=2")
    for name in trainers.TRAINERS if what[0] == "all" else what:
        t0 = time.time()
        tr = harness.quiet(run_step, name, flags, shape, gpus, cuda, prompt_len)
        if what[0] == "all":
            print(f"{name:<12} {tr.peak / GIB:6.2f} GiB per GPU (in the {tr.peak_phase}), "
                  f"H100 step {sum(predicted_times(tr)['H100-80GB']):.1f} s predicted ({time.time() - t0:.0f} s)")
        else:
            print(report(tr) + f"\n({time.time() - t0:.0f} s on this CPU)")


if __name__ == "__main__":
    config.run(main)
