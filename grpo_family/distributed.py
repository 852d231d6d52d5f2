"""
distributed.py: processes and devices. Plain `python x.py` is one process; `torchrun` gives one process per
device, joined in a process group (nccl on GPU, gloo on CPU), and the model is wrapped in DDP or sharded (--fsdp).

    Dist, setup         the process group and this process's device; seed_everything: python, numpy, torch
    cuda_numerics       the one test for "computes as on a GPU": bf16 copies and autocast; autocast
    wrap, micro_batch   what the loss goes through (DDP, FSDP2 or the module), and one micro-batch's context
    all_reduce_sum, all_gather_objects   the two collectives the trainers use
    check_replicas      every rank holds the same weights and took the same optimizer steps
    cleanup, leave      tear the group down together; leave a process that joined one
    note_step, last_step, joined, collective_failure   the last step done; what config.run reports
"""
import dataclasses
import datetime
import os
import random
import sys
import traceback
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from grpo_family import fsdp

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_PACKAGE)


@dataclasses.dataclass
class Dist:
    """What a trainer needs to know about the process group."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master_process: bool


# the last step done (logs.Logger.log and a resume note it), the collective timeout, and whether this process
# joined a process group: what config.run needs when a collective fails, and how a process leaves (leave)
_state = {"step": 0, "timeout": 600.0, "joined": False}


def setup(cfg=None):
    """Init the process group when launched by torchrun (nccl on GPU, gloo on CPU); pick the device. A collective
    waits at most cfg.dist_timeout seconds (default 600: a few minutes beyond the longest expected wait, rank 0
    writing a 1.5B checkpoint with its AdamW state, about 18 GB, while the others wait); then gloo raises and
    config.run names the rank and the step, and nccl's watchdog stops the job."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(False, 0, 0, 1, device, True)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    _state["timeout"] = getattr(cfg, "dist_timeout", 600.0)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=_state["timeout"]))
    _state["joined"] = True
    return Dist(True, rank, local_rank, world_size, device, rank == 0)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# numerics: what a GPU run computes in


def cuda_numerics(device):
    """True where the run computes as on a GPU: a bf16 reference, LoRA base and decoder copy, bf16 autocast over
    fp32 master weights. The one place this is decided (tools/memory.py replaces it to predict a GPU on a CPU)."""
    return device.type == "cuda"


def autocast(device, model=None):
    """bf16 autocast under cuda_numerics (fp32 master weights stay fp32); none on a CPU, nor for a model --fsdp
    sharded (FSDP2 computes in bf16 itself)."""
    if cuda_numerics(device) and not fsdp.is_sharded(model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# the wrapped model, and the collectives


def wrap(module, cfg, d):
    """What the loop's forward goes through: `module` sharded in place (--fsdp), DDP around it (torchrun), or itself."""
    if getattr(cfg, "fsdp", False):
        return fsdp.shard(module, cuda_numerics(d.device))
    return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.ddp else module


def micro_batch(model, d, last):
    """One micro-batch's forward and backward: under DDP only the mini-batch's last all-reduces gradients; under
    --fsdp each reduce-scatters its own (they stay sharded); autocast on CUDA unless FSDP computes in bf16."""
    stack = ExitStack()
    if isinstance(model, DDP) and not last:
        stack.enter_context(model.no_sync())
    stack.enter_context(autocast(d.device, model))
    return stack


def all_reduce_sum(t, d):
    """Sum a tensor over ranks (a no-op on one process); returns the tensor."""
    if d.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, d):
    """Every rank's picklable `obj`, in rank order (a one-item list on one process)."""
    parts = [obj] * d.world_size
    if d.ddp:
        dist.all_gather_object(parts, obj)
    return parts


def check_replicas(module, optimizer, d):
    """Raise unless every rank holds identical parameters and took the same number of optimizer steps."""
    if not d.ddp:
        return
    steps = max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
    with torch.no_grad():
        probe = torch.tensor([float(steps)] + [fsdp.full(p).double().sum().item() for p in module.parameters()],
                             dtype=torch.float64, device=d.device)
    lo, hi = probe.clone(), probe.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"DDP replicas diverged: optimizer steps {lo[0].item():.0f}..{hi[0].item():.0f}, "
                           f"{int((lo[1:] != hi[1:]).sum())} parameter tensors differ across ranks")


# -----------------------------------------------------------------------------
# leaving: together at the end, with one line when a peer is lost


def cleanup(d):
    """Tear down the process group if there is one, every rank at once (a peer that leaves early can abort gloo)."""
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()


def note_step(step):
    """Record the last step done: a failed collective's message names it."""
    _state["step"] = step


def last_step():
    """The last step done (0 before the first): what a message about the run's state names."""
    return _state["step"]


def joined():
    """True if this process joined a process group (it then leaves through leave)."""
    return _state["joined"]


def leave(code):
    """Exit with `code`. A process that joined a process group leaves through os._exit once its output is flushed
    (and wandb finished): interpreter finalization would run while a gloo worker thread may still be dropping the
    last collective's work, whose tensors then need the GIL of a dying interpreter, and the process aborts after a
    correct run (SIGABRT: "terminate called without an active exception"). Every file we write is closed by then."""
    if not _state["joined"]:
        sys.exit(code)
    if getattr(sys.modules.get("wandb"), "run", None) is not None:
        sys.modules["wandb"].finish(exit_code=code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def collective_failure(e):
    """The one line for a collective that timed out or lost a peer (this rank, the last step done, and the line that
    waited: the script's own, e.g. grpo.py's step, else the plumbing's), or None if `e` is another error."""
    timed_out = any(s in str(e) for s in ("Timed out waiting", "Application timeout caused pair closure"))  # gloo
    if not (dist.is_initialized() and (timed_out or any(s in str(e) for s in ("Connection closed by peer",
                                                                              "Connection reset by peer")))):
        return None
    frames = traceback.extract_tb(e.__traceback__)
    script = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(sys.argv[0])]  # the trainer's line
    ours = script or [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) in (_REPO, _PACKAGE)]
    at = f" at {os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else ""
    what = (f"waited {_state['timeout']:g} s for the other ranks in a collective{at}: one of them stalled or is "
            "far slower; see its output, or raise --dist_timeout" if timed_out else
            f"lost the connection to another rank in a collective{at}: it died or was killed; see its output")
    return f"rank {dist.get_rank()}: after step {_state['step']}, {what}"
