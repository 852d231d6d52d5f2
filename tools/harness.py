"""
harness.py: one step of a trainer's own main(), with the plumbing around the step replaced. tools/memory.py runs
it on fake tensors to predict memory; tools/explain.py runs it on a fixed batch to read each token's gradient. Both
see exactly what the trainer's loop does, because it is the trainer's loop that runs.

The seam. A trainer reaches the plumbing only through the attributes of the grpo_family modules it imports
(`rollout.sample(...)`, never a name imported from them), and so does the plumbing within itself; replacing an
attribute for the duration of the step therefore replaces it for the trainer and for every plumbing function that
calls it. replace() refuses an attribute that does not exist, so a renamed function fails here, loudly.

    Step(name, flags, d, problems, tok)   the trainer's main() for one step, argv built from flags (parsed as the
                                          trainer parses them under d's world size: what it refuses, refused): no
                                          run dir, checkpoint, log or held-out evaluation; the given Dist, problems,
                                          tokenizer
    Step.replace(obj, attr, value)        a further replacement for the duration of run()
    Step.run()                            run main() once under the replacements
    quiet(fn, ...)                        fn with the trainer's own printing (progress bar, held-out lines) silenced
    NullLogger, no_evaluation             what replaces logs.Logger and evaluation.evaluate in such a step
"""
import contextlib
import io
import os
import sys
import warnings

from grpo_family import checkpoint, config, distributed, evaluation, loading, logs
from tools import trainers


class NullLogger:
    """logs.Logger's interface, writing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def log(self, step, metrics):
        pass


def no_evaluation(*args, **kwargs):
    """evaluation.evaluate's result shape, for a step that evaluates nothing."""
    return {"strict": 0.0, "lenient": 0.0, "n": 0}


class Step:
    """Trainer `name`'s main() for one step with `flags` (any --key=value it takes), on `problems` with `tok`, as the
    process `d` describes. .cfg is the trainer's parsed Config."""

    def __init__(self, name, flags, d, problems, tok):
        self.name, self.trainer = name, trainers.load(name)
        self.argv = [f"{name}.py", *flags, "--num_steps=1", "--save_every=1", "--eval_every=0",
                     "--run_dir=harness-no-run-dir"]
        with _environ("WORLD_SIZE", str(d.world_size)):  # config.parse's rule: the batch splits over the processes
            self.cfg = config.parse(self.trainer.Config, self.argv[1:], tiny=getattr(self.trainer, "TINY", None))
        self._replacements = []
        for obj, attr, value in [
                (distributed, "setup", lambda cfg=None: d), (checkpoint, "start_run", lambda cfg, dd: ""),
                (checkpoint, "save", lambda *a, **k: None), (logs, "Logger", NullLogger),
                (evaluation, "evaluate", no_evaluation), (loading, "model_path", lambda name, dd: name),
                (loading, "problems", lambda cfg, split: problems), (loading, "tokenizer", lambda path: tok),
                (sys, "argv", self.argv)]:
            self.replace(obj, attr, value)

    def replace(self, obj, attr, value):
        """Replace obj.attr by value while run() runs; obj.attr must exist."""
        if not hasattr(obj, attr):
            raise AttributeError(f"harness: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r} to replace")
        self._replacements.append((obj, attr, value))

    def run(self):
        """main() once, under every replacement (all undone after, whatever happens)."""
        with contextlib.ExitStack() as stack:
            for obj, attr, value in self._replacements:
                stack.enter_context(_replaced(obj, attr, value))
            self.trainer.main()


@contextlib.contextmanager
def _replaced(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def _environ(key, value):
    """os.environ[key] = value while the block runs, then as it was."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) with the trainer's own printing (progress bar, held-out lines, warnings) silenced."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
