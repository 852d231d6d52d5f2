"""
tracker.py: counting what a step allocates and computes, on fake tensors (shapes and dtypes, no data), for
tools/prediction.py and tools/memory.py.

    Tracker         a FakeTensorMode that counts every storage an op returns until Python frees it: the bytes live
                    now, the peak and what was live at it by label (what each storage holds), FLOPs by phase
    flop_count      the FLOPs of one aten op by torch.utils.flop_counter's formulas (CPU flash attention added)
    FlopCount       the same FLOPs counted on real tensors, with no reference kept to any of them
    tensors         the tensors inside a value a replaced function returned (a tensor, a tuple, a Rollout)
"""
import contextlib
import weakref
from collections import Counter

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class Tracker(FakeTensorMode):
    """Fake tensors that count storages: bytes live now, the peak and the storages live at it, each with a label
    (what it holds), and FLOPs by phase."""

    def __init__(self, cuda):
        super().__init__(allow_non_fake_inputs=True)
        self.cuda, self.now, self.peak, self.at_peak, self.depth, self.counted = cuda, 0, 0, (), 0, 0
        self.live, self.info, self.uids = {}, {}, 0      # storage key -> uid; uid -> [bytes, label]
        self.label, self.phase = "other", "setup"
        self.flops, self.phase_peak = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):  # a value read back: 1, unless the
            if getattr(args[0], "constant", None) is None:                    # tensor was made from a known number
                return True if func is aten.is_nonzero.default else (1.0 if args[0].dtype.is_floating_point else 1)
        if func is aten.nonzero.default:  # a data-dependent size: the largest (every element)
            x = args[0]
            out = super().__torch_dispatch__(aten.empty.memory_format, types, ([x.numel(), x.dim()],),
                                             dict(dtype=torch.long, device=x.device))
        else:  # an op without a meta kernel runs as a decomposition, whose ops come back here nested: a real kernel
            self.depth, before = self.depth + 1, self.counted  # allocates only its outputs, so only the outermost
            try:                                                 # op's outputs count, and its FLOPs if it has a formula
                out = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self.depth -= 1
            flops = flop_count(func, args, kwargs, out)
            if flops:
                self.count(flops - (self.counted - before))
        if self.depth == 0:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.allocated(t)
        return out

    def count(self, flops):
        self.flops[self.phase] += flops
        self.counted += flops

    def allocated(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        n = -(-n // 512) * 512 if self.cuda else n  # CUDA's caching allocator rounds every block up to 512 bytes
        self.uids += 1
        label = self.label
        if label == "other" and torch._C._current_graph_task_id() != -1:
            label = "activations"  # the backward's temporaries (and recomputed checkpointed layers)
        self.live[key], self.info[self.uids] = self.uids, [n, label]
        self.now += n
        weakref.finalize(st, self.freed, key)
        if self.now > self.phase_peak[self.phase]:
            self.phase_peak[self.phase] = self.now
        if self.now > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.now, tuple(self.live.values()), self.phase

    def freed(self, key):
        uid = self.live.pop(key, None)
        if uid is not None:
            self.now -= self.info[uid][0]

    def relabel(self, tensors, label):
        """Say what these tensors' storages hold (a parameter's gradient, an optimizer state, ...)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in self.live:
                self.info[self.live[t.untyped_storage()._cdata]][1] = label

    @contextlib.contextmanager
    def labelled(self, label, phase=None):
        old = self.label, self.phase
        self.label, self.phase = label, phase or self.phase
        try:
            yield
        finally:
            self.label, self.phase = old

    def breakdown(self):
        """{label: bytes} of what was live at the peak, by what each storage turned out to hold."""
        out = Counter()
        for uid in self.at_peak:
            n, label = self.info[uid]
            out[label] += n
        return out


# CPU flash attention, which torch.utils.flop_counter does not list: the formulas of its CUDA kernels (shapes in)
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_val=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_val=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v)}


def flop_count(func, args, kwargs, out):
    """FLOPs of one aten op by torch.utils.flop_counter's formulas (0 for ops it does not count)."""
    packet = func._overloadpacket
    if packet in CPU_ATTENTION:
        return CPU_ATTENTION[packet](*[a.shape if isinstance(a, torch.Tensor) else a for a in args])
    f = flop_counter.flop_registry.get(packet)
    return f(*args, **kwargs, out_val=out) if f else 0


def tensors(obj):
    """The tensors in a value a patched function returned (a tensor, a tuple, a Rollout)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in tensors(x)]
    is_rollout = hasattr(obj, "__dataclass_fields__")
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)] if is_rollout else []


class FlopCount(TorchDispatchMode):
    """The FLOPs of the real ops run under it, by the same formulas (and no reference kept to any tensor:
    FlopCounterMode's module tracker hooks the modules' outputs and so moves the peak it would measure)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += flop_count(func, args, kwargs or {}, out)
        return out
