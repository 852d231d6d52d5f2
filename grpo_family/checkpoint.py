"""
checkpoint.py: checkpoints and run dirs, the plumbing of saving and resuming.

    start_run           check the run dir (only this project's run files) and the resume point before anything loads
    save                ckpt-N: Hugging Face weights + trainer state + RNG, atomically; `latest` names a complete one;
                        further networks (PPO's critic) and their optimizers saved whole beside the policy's
    restore             the optimizer, RNG and further networks' state back, every file loaded as plain data
    resolve_latest      a run dir's `latest`, never followed outside it; find: what --resume takes
    run_files, read_run_config    what a run leaves in its dir; a checkpoint's saved settings

A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts): loading one never runs code.
"""
import dataclasses
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from grpo_family import distributed, fsdp, jsonfile, logs, lora
from grpo_family.config import UserError, run_name, same_on_every_rank


# what a failed write raises: the OS's error, torch.save's writer (RuntimeError: "unexpected pos ...", "file write
# failed") and safetensors' (SafetensorError: "I/O error: No space left on device"); each stops the save in one line
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)

# settings a resume may change: they steer logging and saving, not the trained numbers
RESUME_MAY_CHANGE = ("resume", "run_dir", "overwrite", "num_steps", "eval_every", "eval_problems", "save_every",
                     "wandb_project", "dist_timeout")


def run_files(run_dir):
    """The work a run leaves in its dir: checkpoints (complete or not) and `latest`."""
    found = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(x for x in found if re.fullmatch(r"ckpt-\d+(\.tmp|\.old)?", x) or x == "latest")


def _check_run_dir(run_dir):
    """Refuse a run dir that holds anything but this project's run files, or run files without its run_id marker
    (a model dir, a home dir): a run writes config.json and deletes checkpoints there."""
    found = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    links = sorted(x for x in found if os.path.islink(os.path.join(run_dir, x)))
    if links:  # a run writes (and with --overwrite deletes) its files itself, never through a link to elsewhere
        raise UserError(f"run_dir {run_dir} holds links ({', '.join(links[:3])}): a run never writes through a link; "
                        "remove them or pick another --run_dir; nothing there was changed")
    ours = set(run_files(run_dir)) | {"config.json", "metrics.jsonl", "latest.tmp"}
    foreign = sorted(found - ours - {"run_id", "stdout.log", "wall_time.json"})  # the last two: compare.py's
    if foreign or (found & ours and "run_id" not in found):
        what = f"holds files no run of this project writes ({', '.join(foreign[:3])})" if foreign else \
            "has no run_id file, so no run of this project wrote it"
        raise UserError(f"run_dir {run_dir} {what}: pick a new or empty --run_dir; nothing there was changed")


def read_run_config(ckpt):
    """The run_config.json of a checkpoint: {'config', 'run_id', 'step'}; a damaged file is a UserError."""
    path = os.path.join(ckpt, "run_config.json")
    try:
        return _fields(jsonfile.load(path), {"config": dict, "run_id": str, "step": int}, path)
    except (OSError, jsonfile.JSONError) as e:
        raise UserError(f"{path}: cannot read the checkpoint's settings ({e}); resume from another "
                        "ckpt-* dir") from None


def _fields(obj, types, path):
    """obj, if it is a dict holding every key of `types` with a value of that type; else a UserError naming path."""
    bad = [k for k, t in types.items() if not isinstance(obj, dict) or not isinstance(obj.get(k), t)
           or (t is int and isinstance(obj.get(k), bool))]
    if bad:
        raise UserError(f"{path}: damaged or not written by this project ({', '.join(bad)} missing or of the wrong "
                        "type); resume from another ckpt-* dir")
    return obj


def _step(line, where):
    """The step of one metrics.jsonl row; a damaged row is a UserError naming it."""
    try:
        row = jsonfile.loads(line, where)
    except jsonfile.JSONError as e:
        raise UserError(f"{e}: the run's log is damaged; move metrics.jsonl aside to resume") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise UserError(f"{where}: not a metrics row (no integer 'step'); move metrics.jsonl aside to resume")
    return row["step"]


def start_run(cfg, d):
    """Check the run dir and the resume point before anything loads; returns the checkpoint to resume ("" = fresh).
    --resume without --run_dir goes on in the dir that holds the checkpoint.

    A fresh run refuses a run_dir holding another run's checkpoints (resume it, pick another dir, or --overwrite
    them); --resume refuses other settings than the saved ones, listing them. run_dir/run_id tags checkpoints.
    """
    ckpt, run_id, saved_step, theirs = _check_start(cfg)
    id_file = os.path.join(cfg.run_dir, "run_id")
    for x in theirs + ["metrics.jsonl", "latest.tmp"] if theirs and d.master_process else []:  # --overwrite
        path = os.path.join(cfg.run_dir, x)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if run_id is None:  # a fresh run: a new id, the same on every rank
        run_id = distributed.all_gather_objects(os.urandom(8).hex(), d)[0]
    if d.master_process:
        try:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id)
        except OSError as e:
            raise UserError(f"cannot write the run dir: {e.filename or cfg.run_dir}: {e.strerror or e}; pick "
                            "a writable --run_dir") from None
        log = os.path.join(cfg.run_dir, "metrics.jsonl")
        if ckpt and os.path.isfile(log):  # steps logged after the saved one run again: keep the first telling only
            with open(log, encoding="utf-8", errors="replace") as f:
                rows = [x for n, x in enumerate(f, 1) if x.strip() and _step(x, f"{log}:{n}") <= saved_step]
            with open(log, "w") as f:
                f.writelines(rows)
        if os.path.exists(os.path.join(cfg.run_dir, "latest.tmp")):
            os.remove(os.path.join(cfg.run_dir, "latest.tmp"))
    if d.ddp:
        dist.barrier()
    return ckpt


@same_on_every_rank  # every process reads the same flags and files: one line says a mistake
def _check_start(cfg):
    """start_run's checks, which write nothing: (checkpoint to resume or "", its run id or None, its step, another
    run's files in run_dir that --overwrite deletes)."""
    ckpt, run_id, saved_step = "", None, 0
    if cfg.resume:
        ckpt = find(cfg.resume)
        saved = read_run_config(ckpt)
        trainer = saved.get("trainer")
        if not isinstance(trainer, str):  # never guessed: another trainer would go on from this one's state
            raise UserError(f"{ckpt}/run_config.json names no trainer (damaged, or not written by this project): "
                            "resume from another ckpt-* dir, or start a new run")
        if trainer != run_name(type(cfg)):
            raise UserError(f"{ckpt} was written by {trainer}.py, not {run_name(type(cfg))}.py: resume it with "
                            f"{trainer}.py, or start a new run")
        now = dataclasses.asdict(cfg)
        diff = [f"--{k}={now[k]!r} (saved: {v!r})" for k, v in saved["config"].items()
                if k in now and k not in RESUME_MAY_CHANGE and now[k] != v]
        if diff:
            raise UserError(f"{ckpt} was saved with other settings; resume with the saved ones, or start a new run: "
                            + "; ".join(diff))
        if saved["step"] >= cfg.num_steps:
            raise UserError(f"{ckpt} is at step {saved['step']} and --num_steps={cfg.num_steps}: nothing to do; "
                            "raise --num_steps to train further")
        run_id, saved_step = saved["run_id"], saved["step"]
        if not cfg.run_dir:  # no --run_dir: the run goes on where it was saved, never into the default dir
            cfg.run_dir = os.path.dirname(os.path.abspath(ckpt))
    _check_run_dir(cfg.run_dir)
    theirs, id_file = run_files(cfg.run_dir), os.path.join(cfg.run_dir, "run_id")
    if theirs and not (os.path.isfile(id_file) and open(id_file).read().strip() == run_id):  # another run's work
        if not cfg.overwrite:
            raise UserError(f"run_dir {cfg.run_dir} already holds another run ({', '.join(theirs[:4])}): resume it "
                            f"with --resume={cfg.run_dir}, pick another --run_dir, or pass --overwrite to delete it")
        return ckpt, run_id, saved_step, theirs
    return ckpt, run_id, saved_step, []


def _all_wrote(err, d, step, where):
    """After a phase of writes into `where` (ckpt-N.tmp): every rank learns whether any rank's write failed (this is
    the phase's barrier too); then the partial copy goes and all stop together, one line naming the path and the fix.
    `latest` was not touched (unless a re-save had moved ckpt-N aside: then ckpt-N.tmp stays, for resolve_latest)."""
    failed = torch.tensor([float(err is not None)], device=d.device)
    if d.ddp:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() and d.master_process and not os.path.isdir(where[:-len(".tmp")] + ".old"):
        shutil.rmtree(where, ignore_errors=True)  # a partial copy would hold the space a full disk lacks
    if err is not None:
        why = f"{err.filename or where}: {err.strerror or err}" if isinstance(err, OSError) else \
            f"{where}: a write failed ({str(err).strip().splitlines()[0][:160]})"  # torch's and safetensors' writers
        raise UserError(f"step {step}: cannot write the checkpoint: {why}; free disk space or make "
                        f"{os.path.dirname(where)} writable, then --resume from it (`latest` still names the last "
                        "complete checkpoint)")
    if failed.item():
        raise UserError(f"step {step}: another rank could not write the checkpoint {where} (its line says why)")


@torch.no_grad()
def _logits_finite(lm, tok, d):
    """One forward of a few tokens: an update can leave every weight finite yet so large that the logits overflow,
    and the next rollout's sampling would fail on them. Under --fsdp the forward runs on the decode copy (gathered
    by every rank together; the next rollout reuses it, as no update comes between)."""
    lm = fsdp.decode_copy(lm, distributed.cuda_numerics(d.device))
    ids = tok("1 + 1 = 2", add_special_tokens=False)["input_ids"]
    was_training = lm.training
    lm.eval()
    logits = lm(input_ids=torch.tensor([ids], device=next(lm.parameters()).device), use_cache=False).logits
    lm.train(was_training)
    return bool(torch.isfinite(logits.float()).all())


def save(run_dir, step, lm, tok, optimizer, cfg, d, modules=None, extra=None, keep=2):
    """Write run_dir/ckpt-{step} (HF format + trainer state) atomically; keep this run's last `keep` checkpoints.
    modules: {name: (network, its optimizer)} saved whole in the trainer state beside the policy's (PPO's critic);
    extra: values a trainer measured and needs back on a resume. At every instant `latest` names a complete
    checkpoint, and a write that fails (a full disk, a read-only dir) stops every rank with one line, its partial
    copy removed."""
    sharded = fsdp.is_sharded(lm)  # --fsdp: weights and AdamW's state gathered whole (every rank), rank 0 writes
    if not (fsdp.all_finite(lm, d) if sharded else all(torch.isfinite(p).all() for p in lm.parameters())):  # all stop
        raise UserError(f"step {step}: the weights are not finite: the update diverged (lower --lr={cfg.lr}); "
                        "not saved, `latest` names the last good checkpoint")
    if not _logits_finite(lm, tok, d):  # finite weights can still be exploded ones (every rank: the same weights)
        raise UserError(f"step {step}: the weights give non-finite logits: the update diverged (lower --lr={cfg.lr}); "
                        "not saved, `latest` names the last good checkpoint")
    whole = (fsdp.state_dict(lm, d), fsdp.optimizer_state(optimizer, d)) if sharded else (None, None)
    extra = dict(extra or {})
    for name, (module, opt) in (modules or {}).items():  # whole tensors on rank 0 (every rank gathers under --fsdp)
        extra[name], extra[name + "_optimizer"] = fsdp.state_dict(module, d), fsdp.optimizer_state(opt, d)
    final = os.path.join(run_dir, f"ckpt-{step:06d}")
    tmp, old = final + ".tmp", final + ".old"
    run_id = open(os.path.join(run_dir, "run_id")).read().strip()
    err = None
    if d.master_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except WRITE_ERRORS as e:
            err = e
    _all_wrote(err, d, step, tmp)
    npr = np.random.get_state()  # as plain values and tensors, so that loading it runs no pickled code
    rng = {"python": random.getstate(), "numpy": [npr[0], torch.from_numpy(npr[1].astype(np.int64)), *npr[2:]],
           "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}  # every RNG a run draws from
    try:
        torch.save(rng, os.path.join(tmp, f"rng_rank{d.rank}.pt"))
    except WRITE_ERRORS as e:
        err = e
    _all_wrote(err, d, step, tmp)
    if d.master_process:
        try:
            _write(tmp, final, old, run_dir, step, lm, tok, optimizer, cfg, d, run_id, extra, *whole)
        except WRITE_ERRORS as e:
            err = e
    _all_wrote(err, d, step, tmp)
    if d.master_process:
        ours = [x for x in sorted(os.listdir(run_dir)) if re.fullmatch(r"ckpt-\d+", x)
                and os.path.isfile(os.path.join(run_dir, x, "run_config.json"))
                and read_run_config(os.path.join(run_dir, x))["run_id"] == run_id]
        for x in ours[:-keep]:  # only this run's checkpoints are ever deleted
            shutil.rmtree(os.path.join(run_dir, x))
    if d.ddp:
        dist.barrier()
    return final


def _write(tmp, final, old, run_dir, step, lm, tok, optimizer, cfg, d, run_id, extra, weights=None, opt=None):
    """Rank 0's part of a save: weights, tokenizer, trainer state and run_config.json into tmp, then the renames.
    weights, opt: the whole state dicts a sharded (--fsdp) run gathered, else None (lm's and optimizer's own)."""
    if lora.has_adapters(lm):
        lora.save(lm, tmp)  # the merged weights as a plain model dir, and the adapter
    else:
        lm.save_pretrained(tmp, state_dict=weights)
    tok.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt or optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                "world_size": d.world_size, "extra": extra or {}}, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "run_config.json"), "w") as f:  # written last: tmp is complete
        json.dump({"config": dataclasses.asdict(cfg), "run_id": run_id, "step": step,
                   "versions": logs.versions(cfg), "trainer": run_name(type(cfg))}, f, indent=1)
    if os.path.isdir(final):  # a re-save: renames only, and resolve_latest falls back to the complete tmp
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    with open(os.path.join(run_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(run_dir, "latest.tmp"), os.path.join(run_dir, "latest"))
    shutil.rmtree(old, ignore_errors=True)


def resolve_latest(path):
    """The checkpoint a run dir's `latest` file names (or its complete .tmp copy after a crash mid-re-save);
    any other path unchanged."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        return path
    with open(latest) as f:
        name = f.read().strip()
    if not re.fullmatch(r"ckpt-\d+", name):  # never followed out of the run dir
        raise UserError(f"{latest} names {name[:80]!r}, not one of this run dir's ckpt-* dirs: fix or delete it")
    named = os.path.join(path, name)
    if not os.path.isdir(named) and os.path.isfile(os.path.join(named + ".tmp", "run_config.json")):
        return named + ".tmp"
    return named


def find(path):
    """A checkpoint dir, or a run dir whose `latest` file names one; a UserError if neither exists."""
    path = os.path.expanduser(path)
    if os.path.basename(os.path.normpath(path)) == "latest" and os.path.isfile(path):  # a run dir's `latest` file
        path = os.path.dirname(os.path.abspath(path))
    ckpt = resolve_latest(path)
    if not os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        where = f" (its `latest` names {ckpt})" if ckpt != path else ""
        raise UserError(f"no checkpoint at {path}{where}: --resume takes a ckpt-* dir or a run dir with a "
                        "`latest` file")
    return ckpt


def _load(path, mmap=False):
    """torch.load of a checkpoint file, on the CPU, weights_only: tensors, numbers, strings, lists and dicts, never
    pickled code (a shared checkpoint must not run anything); a missing, damaged or foreign file is a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only met something else than plain data: refused, never run
        if "global" not in str(e).lower():  # not a reference to code: a damaged file
            raise UserError(f"{path}: cannot read this checkpoint file ({str(e)[:120]}); resume from another "
                            "ckpt-* dir") from None
        what = next(x.strip() for x in str(e).splitlines() if "global" in x.lower())
        raise UserError(f"{path}: refused: it holds objects that loading would run ({what[:100]}); only "
                        "checkpoints of plain data (tensors, numbers, strings, lists, dicts) load: use another "
                        "ckpt-* dir") from None
    except Exception as e:  # a truncated or foreign file raises whatever its unpickler meets
        raise UserError(f"{path}: cannot read this checkpoint file ({type(e).__name__}: {str(e)[:120]}); "
                        "resume from another ckpt-* dir") from None


def restore(ckpt, optimizer, d, modules=None):
    """Restore the optimizer, this rank's RNG state and the `modules` save() was given ({name: (network, its
    optimizer)}, sharded again under --fsdp) from ckpt; returns the saved state (step, config, extra)."""
    path = os.path.join(ckpt, "trainer_state.pt")
    # mmap: every rank reads the whole AdamW state, through one copy in the page cache, not one in memory per rank
    fields = {"step": int, "optimizer": dict, "world_size": int, "config": dict, "extra": dict}
    state = _fields(_load(path, mmap=True), fields, path)
    if state["world_size"] != d.world_size:
        raise UserError(f"{ckpt} was written by {state['world_size']} processes; resume it with as many "
                        f"(torchrun --nproc_per_node={state['world_size']}), not {d.world_size}")
    rng_path = os.path.join(ckpt, f"rng_rank{d.rank}.pt")
    rng = _fields(_load(rng_path), {"python": tuple, "numpy": list, "torch": torch.Tensor}, rng_path)
    try:  # a state of another shape: the optimizer's groups, or an RNG state, do not fit
        fsdp.load_optimizer_state(optimizer, state.pop("optimizer"))  # sharded again under --fsdp
        for name, (module, opt) in (modules or {}).items():
            fsdp.load_state(module, state["extra"][name])
            fsdp.load_optimizer_state(opt, state["extra"][name + "_optimizer"])
        random.setstate(rng["python"])
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
        torch.set_rng_state(rng["torch"])
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError) as e:
        raise UserError(f"{ckpt}: its optimizer or RNG state does not fit this run ({type(e).__name__}: "
                        f"{str(e)[:100]}); resume from another ckpt-* dir") from None
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    distributed.note_step(state["step"])  # what a failed collective's message reports until the next step
    return state

