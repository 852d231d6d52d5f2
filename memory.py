"""
memory.py: will it fit? A trainer's own training step, run once on fake tensors (shapes and dtypes, no data) at
the real model's shape: the peak memory per GPU, what holds it, and the FLOPs and predicted time of each phase,
on a CPU, in under a minute. Everything it prints is predicted.

    python memory.py grpo                           # Qwen2.5-1.5B-Instruct at grpo.py's defaults, on one GPU
    python memory.py gspo --gpus=2 --lora_rank=16   # any --key=value the trainer takes; --gpus: DDP over that many
    python memory.py all --gpus=2                   # every trainer, one line each
    python memory.py table                          # README's table: every trainer, full and LoRA, 1 and 2 GPUs
    python memory.py grpo --device=cpu --shape=tiny # the CPU path (fp32, no autocast): what tests/ measure against
    python memory.py --compare=steps.jsonl          # the GPU check: predicted next to torch.cuda.max_memory_allocated

How. The trainer's main() runs for one step under a FakeTensorMode that counts every storage an op returns until
it is freed (bytes rounded up to 512, as CUDA's caching allocator rounds), the high-water mark and what was live
at it, each storage labelled by what it holds, and the FLOPs of every matmul and attention (torch.utils.
flop_counter's formulas). The plumbing is stubbed: the model is built at the chosen shape, every prompt is
--prompt_len tokens (GSM8K's longest by default), EOS is never drawn (every completion runs to max_new_tokens),
checkpoints, logging and the held-out evaluation are skipped. A value read back (loss.item(), `.any()`) reads 1
unless the tensor was made from a known number; a data-dependent size (nonzero) is its largest. CUDA's path runs on
fake CPU tensors (common.GPU_PATH: bf16 reference, LoRA base and decoder copies, bf16 autocast; AdamW's foreach
kernels; decode windows of 128 as the CUDA graphs take them).

Two shortcuts keep a 1.5B step under a minute, both exact for what is predicted: a decode step reruns only for a
new attention window, the others allocate their output and add the FLOPs of their window; and a micro-batch whose
shapes, grad mode, gradient and optimizer state were seen before (or which the next mini-batch's dominates)
returns fresh outputs of the same shapes and adds the FLOPs the real one counted: accumulating into an existing
gradient allocates nothing that lasts. Not modelled: --fsdp (docs/fsdp.md), the CUDA context and fragmentation,
library workspaces, the held-out evaluation. Method and validation: docs/memory.md.
"""
import contextlib
import importlib
import importlib.util
import json
import sys
import time
import weakref
from collections import Counter

import torch

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import common
import decoder

aten = torch.ops.aten
GIB = 2 ** 30
TRAINERS = ["grpo", "dapo", "gspo", "sapo", "gfpo", "gtpo", "ppo", "dpo", "drgrpo", "cispo",
            "rloo", "maxrl", "gmpo", "gdpo", "dppo", "reinforcepp"]
# the models' config.json on the Hugging Face hub (Qwen/Qwen2.5-*-Instruct); "width2": 1.5B's width with 2 layers,
# "tiny": tiny.py's model (tests compare these two with measured CPU runs)
_QWEN = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, **_QWEN),
    "width2": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
    "tiny": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True, max_position_embeddings=512,
                 bos_token_id=None, eos_token_id=None),
}
# dense bf16 tensor-core peak (FLOP/s), memory bandwidth (bytes/s) and nominal memory (GB): the vendors' datasheets
GPUS = {"A100-40GB": (312e12, 1.555e12, 40), "A100-80GB": (312e12, 2.039e12, 80),
        "H100-80GB": (989e12, 3.35e12, 80), "RTX 4090 (24 GB)": (165e12, 1.008e12, 24)}
MFU, BW = 0.4, 0.6  # assumed: fraction of peak FLOP/s the forward/backward reach, and of bandwidth a decode step does
CATEGORIES = ["weights", "critic (PPO)", "gradients", "DDP gradient buckets", "optimizer state", "reference model",
              "decoder weight copies", "KV cache", "rollout: logits and sampling", "rollout batch and log-probs",
              "activations", "log-prob chunks", "other"]


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


class StubTokenizer:
    """Every prompt is `prompt_len` tokens; EOS is an id outside the vocabulary, so no completion ends early."""

    def __init__(self, prompt_len, vocab_size):
        self.prompt_len, self.pad_token_id, self.eos_token_id = prompt_len, 0, vocab_size

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "prompt"

    def __call__(self, texts, **kwargs):
        shape = (len(texts), self.prompt_len)
        return {"input_ids": torch.ones(shape, dtype=torch.long), "attention_mask": torch.ones(shape, dtype=torch.long)}

    def batch_decode(self, ids, **kwargs):
        return [""] * ids.shape[0]


class Logger:
    def __init__(self, *args, **kwargs):
        pass

    def log(self, step, metrics):
        pass


def build_model(shape, dtype):
    """A Qwen2ForCausalLM of `shape` in `dtype` (fake weights under the tracker, random real ones outside it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    return model.eval()


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_step(name, flags, shape="qwen2.5-1.5b", gpus=1, cuda=True, prompt_len=248, fake=True):
    """Run trainer `name`'s main() for one step with `flags` at `shape` as rank 0 of `gpus` DDP ranks: under the
    Tracker (fake=True), returning it, or for real on the CPU (fake=False: what the agreement test measures)."""
    trainer = importlib.import_module(name)
    tr = Tracker(cuda) if fake else None
    label = (lambda *a, **k: tr.labelled(*a, **k)) if fake else (lambda *a, **k: contextlib.nullcontext())
    if any(f.split("=")[0] == "--fsdp" and f.split("=", 1)[-1] in ("--fsdp", "true", "1") for f in flags):
        raise common.UserError("memory.py does not model --fsdp: docs/fsdp.md has its predicted table "
                               "(python scripts/fsdp_memory.py)")
    argv = [f"{name}.py", *(["--fast_rollout=true"] if cuda else []), *flags, "--num_steps=1", "--save_every=1",
            "--eval_every=0", "--run_dir=memory-prediction"]
    d = common.Dist(False, 0, 0, gpus, torch.device("cpu"), True)
    cfg = common.parse_config(trainer.Config, argv[1:], tiny=getattr(trainer, "TINY", None))
    state = {"steps": 0, "seen": set(), "flops": {}, "proto": {}, "open": None, "decode": [],
             "minibatches": getattr(cfg, "num_minibatches", 1)}

    def wrap_fn(fn, lab, phase=None, out_label=None):
        def inner(*a, **k):
            with label(lab, phase):
                out = fn(*a, **k)
            if fake and out_label:
                tr.relabel(tensors(out), out_label)
            return out
        return inner

    def load_policy(path, ckpt, cfg, dd):
        with label("weights", "setup"):
            p = orig["load_policy"](path, ckpt, cfg, dd)
        state["params"] = sum(q.numel() for q in p.parameters())
        state["trainable"] = sum(q.numel() for q in p.parameters() if q.requires_grad)
        for prm in p.parameters():
            if prm.requires_grad and fake:
                prm.register_post_accumulate_grad_hook(lambda q: tr.relabel([q.grad], "gradients"))
        return p

    def wrap(module, cfg, dd):
        out = orig["wrap"](module, cfg, d)
        if gpus > 1:  # DDP keeps a flat copy of the gradients in its buckets (gradient_as_bucket_view=False)
            with label("DDP gradient buckets"):
                state["buckets"] = [torch.empty(p.numel(), dtype=p.dtype) for p in module.parameters()
                                    if p.requires_grad]
        return out

    def close_open():
        """The FLOPs since the last real micro-batch began are that shape's cost (forward, loss and backward)."""
        if state["open"] and fake:
            key, start = state["open"]
            state["flops"].setdefault(key, tr.flops[tr.phase] - start)
        state["open"] = None

    def skipping(fn):
        """A network's forward (the policy's, PPO's critic's) that reruns only in a state not seen before."""
        def forward(self, *args, **kwargs):
            close_open()
            grad = torch.is_grad_enabled()
            off = next((m.disable_adapters for m in self.modules() if hasattr(m, "base_layer")), False)  # LoRA's ref
            shapes = (id(self), grad, off, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            key = shapes + (grad and any(p.grad is not None for p in self.parameters() if p.requires_grad),
                            state["steps"] > 0)
            # the second micro-batch before the first optimizer step is the next mini-batch's, less AdamW's state
            dominated = grad and key[-2] and not key[-1] and state["minibatches"] > 1
            if fake and (key in state["seen"] or dominated) and shapes in state["flops"]:
                tr.count(state["flops"][shapes])
                many, protos = state["proto"][shapes]
                with label("activations" if grad else "log-prob chunks"):
                    outs = [torch.zeros(shape, dtype=dtype, requires_grad=rg) for shape, dtype, rg in protos]
                return tuple(outs) if many else outs[0]
            state["seen"].add(key)
            state["open"] = (shapes, tr.flops[tr.phase]) if fake else None
            with label("activations"):
                out = fn(self, *args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            state["proto"][shapes] = (isinstance(out, tuple), [(t.shape, t.dtype, t.requires_grad) for t in outs])
            return out
        return forward

    def decoder_init(self, model, batch, cache_len, dtype):
        with label("decoder weight copies"):
            orig["decoder_init"](self, model, batch, cache_len, dtype)
        if fake:
            tr.relabel(self.k + self.v + [self.valid], "KV cache")
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        self.kv_bytes = nbytes(self.k + self.v)
        self.w_bytes = nbytes([t for layer in self.w for wb in layer for t in wb] + list(self.lm_head))
        self.seen_windows, self.window_flops = {}, {}

    def decoder_step(self, window):
        cache_len = self.k[0].shape[2]
        if cuda:  # CUDA graphs: a graph per window of 128 slots, each keeping its output in the graph pool
            window = min(cache_len, -(-window // 128) * 128)
        if fake:
            start = tr.flops[tr.phase]
            try:
                return skip_or_step(self, window, cache_len)
            finally:  # a decode step reads the weight copies and the window's keys and values: its roofline terms
                state["decode"].append((tr.flops[tr.phase] - start, self.w_bytes + self.kv_bytes * window / cache_len))
        return orig["decoder_step"](self, window)

    def skip_or_step(self, window, cache_len):
        if window not in self.seen_windows and (len(self.seen_windows) < 2 or window >= cache_len - 1):
            start = tr.flops[tr.phase]
            with label("rollout: logits and sampling"):
                out = orig["decoder_step"](self, window)
            self.window_flops[window] = tr.flops[tr.phase] - start
            self.seen_windows[window] = out if cuda else None
            return out
        if window in self.window_flops:
            tr.count(self.window_flops[window])
        else:  # a window between two that ran: attention's FLOPs are linear in the window
            (w1, f1), (w2, f2) = sorted(self.window_flops.items())[:2]
            tr.count(f1 + (window - w1) * (f2 - f1) / (w2 - w1))
        if cuda:
            return self.seen_windows[window] if window in self.seen_windows else torch.zeros_like(
                self.seen_windows[next(iter(self.seen_windows))])
        with label("rollout: logits and sampling"):
            return torch.zeros(self.tokens.shape[0], self.lm_head[0].shape[0], dtype=torch.float32)

    def step_pre(opt, args, kwargs):
        close_open()
        if fake:
            tr.label_stack = tr.label
            tr.label = "optimizer state"

    def step_post(opt, args, kwargs):
        state["steps"] += 1
        if fake:
            tr.label = tr.label_stack
            tr.relabel([t for s in opt.state.values() for t in s.values()], "optimizer state")

    def critic_init(self, *args, **kwargs):
        orig["critic_init"](self, *args, **kwargs)
        if fake:  # its weights: a copy of the model loaded just before, and the value head
            tr.relabel(list(self.parameters()), "critic (PPO)")
            for prm in self.parameters():
                prm.register_post_accumulate_grad_hook(lambda q: tr.relabel([q.grad], "gradients"))

    critic = getattr(trainer, "Critic", None)
    orig = dict(load_policy=common.load_policy, wrap=common.wrap, forward=common.Policy.forward,
                critic_init=critic and critic.__init__, critic_forward=critic and critic.forward,
                decoder_init=decoder.StaticDecoder.__init__, decoder_step=decoder.StaticDecoder.step)
    tok = StubTokenizer(prompt_len, SHAPES[shape]["vocab_size"])
    problems = [{"question": "q", "answer": "1"} for _ in range(4096)]
    evaluate = lambda *a, **k: {"strict": 0.0, "lenient": 0.0, "n": 0}  # noqa: E731
    with contextlib.ExitStack() as stack:
        for obj, attr, value in [
                (common, "GPU_PATH", cuda), (common, "setup_distributed", lambda cfg=None: d),
                (common, "start_run", lambda cfg, dd: ""), (common, "model_path", lambda n, dd: n),
                (common, "load_problems", lambda cfg, split: problems), (common, "load_tokenizer", lambda p: tok),
                (common, "load_model", lambda path, device, dtype=torch.float32: build_model(shape, dtype)),
                (common, "load_policy", load_policy), (common, "wrap", wrap),
                (common, "reference_model", wrap_fn(common.reference_model, "reference model", "setup")),
                (common, "generate", wrap_fn(common.generate, "rollout: logits and sampling", "rollout",
                                             "rollout batch and log-probs")),
                (common, "batched_logprobs", wrap_fn(common.batched_logprobs, "log-prob chunks", "log-probs",
                                                     "rollout batch and log-probs")),
                (common.Policy, "forward", skipping(orig["forward"])), (common, "Logger", Logger),
                (common, "_token_logprobs", wrap_fn(common._token_logprobs, "log-prob chunks")),
                (common, "save_checkpoint", lambda *a, **k: None), (common, "check_replicas", lambda *a: None),
                (common, "all_gather_objects", lambda obj, dd: [obj] * gpus),
                (common, "all_reduce_sum", lambda t, dd: t * gpus),  # every rank holds as much as this one
                (trainer.evaluation, "evaluate", evaluate),
                (decoder.StaticDecoder, "__init__", decoder_init), (decoder.StaticDecoder, "step", decoder_step),
                (sys, "argv", argv)]:
            stack.enter_context(patched(obj, attr, value))
        if fake and importlib.util.find_spec("peft"):  # peft casts new adapters to the base's dtype (a fake tensor
            from peft.tuners.tuners_utils import BaseTunerLayer  # cannot be cast in place); lora.add makes them fp32
            stack.enter_context(patched(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None))
            to = torch.nn.Module.to  # nor moved to the device they are on: every fake tensor is on the CPU
            stack.enter_context(patched(torch.nn.Module, "to", lambda self, *a, **k: self if all(
                torch.device(x).type == "cpu" for x in a + tuple(k.values()) if isinstance(x, (str, torch.device)))
                and not any(isinstance(x, torch.dtype) for x in a + tuple(k.values())) else to(self, *a, **k)))
        if critic:
            stack.enter_context(patched(critic, "__init__", critic_init))
            stack.enter_context(patched(critic, "forward", skipping(orig["critic_forward"])))
        if cuda:  # AdamW's default on CUDA, not on the CPU: the foreach kernels (a temporary sqrt of every 2nd moment)
            stack.enter_context(patched(importlib.import_module("torch.optim.adam"), "_default_to_fused_or_foreach",
                                        lambda *a, **k: (False, True)))
        stack.callback(register_optimizer_step_pre_hook(step_pre).remove)
        stack.callback(register_optimizer_step_post_hook(step_post).remove)
        if fake:
            stack.enter_context(tr)
            tr.phase = "update"  # what runs outside the wrapped phases is the update (and its bookkeeping)
        trainer.main()
        close_open()
    if fake:
        tr.config, tr.state, tr.name, tr.shape, tr.gpus, tr.prompt_len = cfg, state, name, shape, gpus, prompt_len
    return tr


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


def measure(name, flags, shape, prompt_len):
    """(peak bytes, FLOPs) of the same step run for real on the CPU (CPU path, random weights, nothing skipped): the
    peak is the running sum, in time order, of every CPU allocation and free torch.profiler records; the FLOPs
    count every op the step ran. What the agreement test checks the prediction against."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, FlopCount() as flops:
        run_step(name, flags, shape, gpus=1, cuda=False, prompt_len=prompt_len, fake=False)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak, flops.total


def predicted_times(tr):
    """{gpu: (rollout, log-probs, update) seconds}: matmuls at MFU of the GPU's bf16 peak; each decode step at the
    slower of its FLOPs at MFU and its bytes (weight copies, the window's KV cache) at BW of the memory bandwidth."""
    decode_flops = sum(f for f, _ in tr.state["decode"])
    out = {}
    for gpu, (peak, bw, _) in GPUS.items():
        decode = sum(max(f / (peak * MFU), b / (bw * BW)) for f, b in tr.state["decode"])
        out[gpu] = ((tr.flops["rollout"] - decode_flops) / (peak * MFU) + decode,
                    tr.flops["log-probs"] / (peak * MFU), (tr.flops["update"] + tr.flops["setup"]) / (peak * MFU))
    return out


def report(tr):
    """The breakdown for one prediction, as printed."""
    c, s = tr.config, tr.state
    gib = lambda n: f"{n / GIB:6.2f} GiB" if tr.peak > GIB else f"{n / 2**20:6.1f} MiB"  # noqa: E731
    rows = c.batch_prompts // tr.gpus * c.group_size
    what = f"LoRA rank {c.lora_rank}, {s['trainable']:,} trained" if c.lora_rank else "all trained"
    lines = [f"{tr.name}.py on the {tr.shape} shape ({s['params']:,} parameters, {what}), {tr.gpus} GPU"
             f"{'s (DDP)' if tr.gpus > 1 else ''}, {'CUDA' if tr.cuda else 'CPU'} path: PREDICTED",
             f"per GPU: {rows} completions of {tr.prompt_len} + {c.max_new_tokens} tokens, micro-batches of "
             f"{c.micro_batch_size}, gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}, "
             f"beta {getattr(c, 'beta', 0)}, {'fast' if c.fast_rollout else 'generate()'} rollout",
             f"peak memory {gib(tr.peak).strip()} per GPU (in the {tr.peak_phase}); live at the peak:"]
    brk = tr.breakdown()
    lines += [f"  {k:<30} {gib(brk[k])}" for k in CATEGORIES if brk.get(k)]
    lines.append("peak of each phase: " + ", ".join(f"{p} {gib(tr.phase_peak[p]).strip()}"
                                                    for p in ("rollout", "log-probs", "update") if p in tr.phase_peak))
    lines.append(f"FLOPs per GPU: rollout {tr.flops['rollout'] / 1e12:.1f} T ({len(s['decode'])} decode steps), "
                 f"log-probs {tr.flops['log-probs'] / 1e12:.1f} T, update {tr.flops['update'] / 1e12:.1f} T")
    lines.append(f"predicted step time (matmuls at {MFU:.0%} of bf16 peak, decode at {BW:.0%} of memory bandwidth; "
                 "fits: peak + 1 GiB of CUDA context within memory):")
    lines.append(f"  {'GPU':<18} {'memory':>7} {'fits':>5} {'rollout':>8} {'log-probs':>10} {'update':>8} {'step':>8}")
    for gpu, (r, lp, up) in predicted_times(tr).items():
        mem = GPUS[gpu][2]
        lines.append(f"  {gpu:<18} {mem:>4} GB {'yes' if tr.peak / GIB + 1 <= mem else 'no':>5} {r:>7.1f}s "
                     f"{lp:>9.1f}s {up:>7.1f}s {r + lp + up:>7.1f}s")
    return "\n".join(lines)


def quiet(fn, *args, **kwargs):
    """fn(*args, **kwargs) with the trainer's own printing (progress bar, held-out lines, warnings) silenced."""
    import io
    import warnings
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def table(shape, prompt_len, names=TRAINERS, rank=16):
    """README's table: every trainer at its defaults, full fine-tuning and LoRA, on 1 and 2 GPUs (markdown)."""
    head = ["trainer", "full, 1 GPU", "full, 2 GPUs", f"LoRA r{rank}, 1 GPU", f"LoRA r{rank}, 2 GPUs",
            "H100 step, full, 1 GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells, h100 = [], ""
        for lora_flags in ([], [f"--lora_rank={rank}"]):
            for gpus in (1, 2):
                tr = quiet(run_step, name, lora_flags, shape, gpus, True, prompt_len)
                cells.append(f"{tr.peak / GIB:.1f} GiB ({tr.peak_phase})")
                if not lora_flags and gpus == 1:
                    h100 = f"{sum(predicted_times(tr)['H100-80GB']):.1f} s"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {h100} |")
    return "\n".join(lines)


def compare(path, shape, prompt_len):
    """The GPU check's steps (tests/test_gpu.py's JSON lines): each measured peak beside this prediction of it."""
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
    except (OSError, ValueError) as e:
        raise common.UserError(f"--compare={path}: cannot read it as JSON lines ({type(e).__name__}: {e}); give "
                               "the steps.jsonl scripts/gpu_check.sh writes") from None
    for row in rows:  # the four memory layouts (every other trainer is grpo's with another loss), within the time
        if row.get("peak_gib") is None or row.get("trainer") not in ("grpo", "grpo+lora", "ppo", "dpo"):
            continue
        name = row["trainer"].partition("+")[0]
        flags = [f for f in row["settings"] if not f.startswith(("--model=", "--run_dir="))]
        tr = quiet(run_step, name, flags, shape, 1, True, prompt_len)
        print(f"{row['trainer']:<12} predicted {tr.peak / GIB:6.2f} GiB ({tr.peak_phase}), measured "
              f"{row['peak_gib']:6.2f} GiB (torch.cuda.max_memory_allocated, {row.get('device')}), "
              f"measured/predicted {row['peak_gib'] * GIB / tr.peak:.3f}")
    print(f"(prompts taken as {prompt_len} tokens; the measured peak also holds what the test process kept "
          "allocated beside the step, e.g. its fp32 copy of the model)")


def main():
    args, flags = sys.argv[1:], []
    opts = dict(gpus="1", shape="qwen2.5-1.5b", device="cuda", prompt_len="", compare="")
    what = [a for a in args if not a.startswith("--")]
    for a in args:
        key, _, value = a[2:].partition("=")
        if a.startswith("--") and key in opts:
            opts[key] = value
        elif a.startswith("--"):
            flags.append(a)
    if opts["shape"] not in SHAPES:
        raise common.UserError(f"--shape={opts['shape']} is not known: give one of {', '.join(SHAPES)}")
    if opts["device"] not in ("cuda", "cpu"):
        raise common.UserError(f"--device={opts['device']}: give cuda (the GPU's path) or cpu (fp32, no autocast)")
    for key in ("gpus", "prompt_len"):
        if opts[key] and not (opts[key].isdigit() and int(opts[key]) > 0):
            raise common.UserError(f"--{key}={opts[key]} must be a whole number of at least 1")
    shape, gpus, cuda = opts["shape"], int(opts["gpus"]), opts["device"] == "cuda"
    # the longest prompt: of GSM8K's train split in Qwen2.5's tokens (README), of the tiny task in its own tokens,
    # and (--compare) of the tiny task in Qwen2.5's tokens, which the GPU check's steps train on
    prompt_len = int(opts["prompt_len"] or (29 if opts["compare"] else 77 if shape == "tiny" else 248))
    if opts["compare"]:
        return compare(opts["compare"], shape, prompt_len)
    if what[:1] == ["table"] and set(what[1:]) <= set(TRAINERS):  # table [trainer ...]: those rows only
        return print(table(shape, prompt_len, what[1:] or TRAINERS))
    if len(what) != 1 or what[0] not in TRAINERS + ["all"]:
        raise common.UserError(f"give one trainer ({', '.join(TRAINERS)}), `all` or `table [trainer ...]` (got "
                               f"{' '.join(what) or 'nothing'}); e.g. python memory.py grpo --gpus=2")
    for name in TRAINERS if what[0] == "all" else what:
        t0 = time.time()
        tr = quiet(run_step, name, flags, shape, gpus, cuda, prompt_len)
        if what[0] == "all":
            print(f"{name:<12} {tr.peak / GIB:6.2f} GiB per GPU (in the {tr.peak_phase}), "
                  f"H100 step {sum(predicted_times(tr)['H100-80GB']):.1f} s predicted ({time.time() - t0:.0f} s)")
        else:
            print(report(tr) + f"\n({time.time() - t0:.0f} s on this CPU)")


if __name__ == "__main__":
    common.run(main)
