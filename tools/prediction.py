"""
prediction.py: one trainer's own step at a model's shape, on fake tensors (what tools/memory.py prints) or for real
on the CPU (what its agreement test measures against).

    SHAPES          the models' configs (Qwen2.5 0.5B to 7B, width2: 1.5B's width with 2 layers, tiny)
    Prediction      the step (tools/harness.py), its plumbing replaced so that every storage is labelled by what it
                    holds: weights, gradients, AdamW state, the reference, the decoder's copies and KV cache, ...
    run_step        Prediction(...).run(); measure: the same step for real, its peak from torch.profiler's events
    StubTokenizer, build_model, as_method    every prompt prompt_len tokens and no EOS; the model at a shape; a
                    function a class can hold as a method
"""
import contextlib
import importlib
import importlib.util

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from grpo_family import config, decoder, distributed, loading, logprobs, rollout
from tools import harness
from tools.tracker import FlopCount, Tracker, tensors

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


class Prediction:
    """One step of a trainer's own main() (tools/harness.py) at `shape` as rank 0 of `gpus` DDP ranks, under the
    Tracker (fake=True: .tracker holds the prediction), or run for real on the CPU (fake=False: what measure()
    checks the prediction against). Each method below is one replacement of the plumbing the step calls: it labels
    what the storages it allocates hold, and two of them skip work already seen (the module docstring's shortcuts).
    """

    def __init__(self, name, flags, shape="qwen2.5-1.5b", gpus=1, cuda=True, prompt_len=248, fake=True):
        if any(f.split("=")[0] == "--fsdp" and f.split("=", 1)[-1] in ("--fsdp", "true", "1") for f in flags):
            raise config.UserError("tools/memory.py does not model --fsdp: docs/fsdp.md has its predicted table "
                                   "(python -m tools.fsdp_memory)")
        self.name, self.shape, self.gpus, self.cuda, self.prompt_len, self.fake = name, shape, gpus, cuda, \
            prompt_len, fake
        self.tracker = Tracker(cuda) if fake else None
        d = distributed.Dist(False, 0, 0, gpus, torch.device("cpu"), True)
        problems = [{"question": "q", "answer": "1"} for _ in range(4096)]
        self.step = harness.Step(name, [*(["--fast_rollout=true"] if cuda else []), *flags], d, problems,
                                 StubTokenizer(prompt_len, SHAPES[shape]["vocab_size"]))
        self.cfg = self.step.cfg
        self.steps, self.seen, self.shape_flops, self.proto, self.open, self.decode = 0, set(), {}, {}, None, []
        self.minibatches = getattr(self.cfg, "num_minibatches", 1)
        self.orig = dict(policy=loading.policy, wrap=distributed.wrap, forward=logprobs.Policy.forward,
                         decoder_init=decoder.StaticDecoder.__init__, decoder_step=decoder.StaticDecoder.step)
        self.critic = getattr(self.step.trainer, "Critic", None)  # PPO's value model: a second network
        replace = self.step.replace
        for obj, attr, value in [
                (distributed, "cuda_numerics", lambda device: cuda), (loading, "policy", self.load_policy),
                (loading, "model", lambda path, device, dtype=torch.float32: build_model(shape, dtype)),
                (distributed, "wrap", self.wrap),
                (loading, "reference", self.labelled_call(loading.reference, "reference model", "setup")),
                (rollout, "generate", self.labelled_call(rollout.generate, "rollout: logits and sampling", "rollout",
                                                         "rollout batch and log-probs")),
                (logprobs, "batched", self.labelled_call(logprobs.batched, "log-prob chunks", "log-probs",
                                                         "rollout batch and log-probs")),
                (logprobs.Policy, "forward", self.skipping(self.orig["forward"])),
                (logprobs, "token_logprobs", self.labelled_call(logprobs.token_logprobs, "log-prob chunks")),
                (distributed, "check_replicas", lambda *a: None),
                (distributed, "all_gather_objects", lambda obj, dd: [obj] * gpus),
                (distributed, "all_reduce_sum", lambda t, dd: t * gpus),  # every rank holds as much as this one
                (decoder.StaticDecoder, "__init__", as_method(self.decoder_init)),
                (decoder.StaticDecoder, "step", as_method(self.decoder_step))]:
            replace(obj, attr, value)
        if self.critic:
            self.orig.update(critic_init=self.critic.__init__, critic_forward=self.critic.forward)
            replace(self.critic, "__init__", as_method(self.critic_init))
            replace(self.critic, "forward", self.skipping(self.orig["critic_forward"]))
        if fake and importlib.util.find_spec("peft"):  # peft casts new adapters to the base's dtype (a fake tensor
            from peft.tuners.tuners_utils import BaseTunerLayer  # cannot be cast in place); lora.add makes them fp32
            replace(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None)
            to = torch.nn.Module.to  # nor moved to the device they are on: every fake tensor is on the CPU
            replace(torch.nn.Module, "to", lambda m, *a, **k: m if all(
                torch.device(x).type == "cpu" for x in a + tuple(k.values()) if isinstance(x, (str, torch.device)))
                and not any(isinstance(x, torch.dtype) for x in a + tuple(k.values())) else to(m, *a, **k))
        if cuda:  # AdamW's default on CUDA, not on the CPU: the foreach kernels (a temporary sqrt of every 2nd moment)
            replace(importlib.import_module("torch.optim.adam"), "_default_to_fused_or_foreach",
                    lambda *a, **k: (False, True))

    def run(self):
        """The step, under the tracker; returns self."""
        with contextlib.ExitStack() as stack:
            stack.callback(register_optimizer_step_pre_hook(self.optimizer_step_pre).remove)
            stack.callback(register_optimizer_step_post_hook(self.optimizer_step_post).remove)
            if self.fake:
                stack.enter_context(self.tracker)
                self.tracker.phase = "update"  # what runs outside the labelled phases: the update, its bookkeeping
            self.step.run()
            self.close_open()
        return self

    # what was predicted: the tracker's figures
    peak = property(lambda self: self.tracker.peak)
    peak_phase = property(lambda self: self.tracker.peak_phase)
    phase_peak = property(lambda self: self.tracker.phase_peak)
    flops = property(lambda self: self.tracker.flops)

    def breakdown(self):
        return self.tracker.breakdown()

    def label(self, label, phase=None):
        return self.tracker.labelled(label, phase) if self.fake else contextlib.nullcontext()

    def labelled_call(self, fn, label, phase=None, out_label=None):
        """fn, with what it allocates labelled `label` (in `phase`), and its result `out_label` once returned."""
        def call(*args, **kwargs):
            with self.label(label, phase):
                out = fn(*args, **kwargs)
            if self.fake and out_label:
                self.tracker.relabel(tensors(out), out_label)
            return out
        return call

    def load_policy(self, path, ckpt, cfg, d):
        """loading.policy: the weights labelled; each trained parameter's gradient labelled once accumulated."""
        with self.label("weights", "setup"):
            policy = self.orig["policy"](path, ckpt, cfg, d)
        self.params = sum(q.numel() for q in policy.parameters())
        self.trainable = sum(q.numel() for q in policy.parameters() if q.requires_grad)
        for prm in policy.parameters():
            if prm.requires_grad and self.fake:
                prm.register_post_accumulate_grad_hook(lambda q: self.tracker.relabel([q.grad], "gradients"))
        return policy

    def wrap(self, module, cfg, d):
        """distributed.wrap, plus DDP's flat copy of the gradients in its buckets (gradient_as_bucket_view=False)."""
        out = self.orig["wrap"](module, cfg, d)
        if self.gpus > 1:
            with self.label("DDP gradient buckets"):
                self.buckets = [torch.empty(p.numel(), dtype=p.dtype) for p in module.parameters() if p.requires_grad]
        return out

    def critic_init(self, critic, *args, **kwargs):
        """PPO's Critic: its weights (a copy of the model loaded just before, and the value head) and gradients."""
        self.orig["critic_init"](critic, *args, **kwargs)
        if self.fake:
            self.tracker.relabel(list(critic.parameters()), "critic (PPO)")
            for prm in critic.parameters():
                prm.register_post_accumulate_grad_hook(lambda q: self.tracker.relabel([q.grad], "gradients"))

    def close_open(self):
        """The FLOPs since the last real micro-batch began are that shape's cost (forward, loss and backward)."""
        if self.open and self.fake:
            key, start = self.open
            self.shape_flops.setdefault(key, self.tracker.flops[self.tracker.phase] - start)
        self.open = None

    def skipping(self, fn):
        """A network's forward (the policy's, PPO's critic's) that reruns only in a state not seen before."""
        def forward(module, *args, **kwargs):
            self.close_open()
            grad = torch.is_grad_enabled()
            off = next((m.disable_adapters for m in module.modules() if hasattr(m, "base_layer")), False)  # LoRA's ref
            shapes = (id(module), grad, off, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            key = shapes + (grad and any(p.grad is not None for p in module.parameters() if p.requires_grad),
                            self.steps > 0)
            # the second micro-batch before the first optimizer step is the next mini-batch's, less AdamW's state
            dominated = grad and key[-2] and not key[-1] and self.minibatches > 1
            if self.fake and (key in self.seen or dominated) and shapes in self.shape_flops:
                self.tracker.count(self.shape_flops[shapes])
                many, protos = self.proto[shapes]
                with self.label("activations" if grad else "log-prob chunks"):
                    outs = [torch.zeros(shape, dtype=dtype, requires_grad=rg) for shape, dtype, rg in protos]
                return tuple(outs) if many else outs[0]
            self.seen.add(key)
            self.open = (shapes, self.tracker.flops[self.tracker.phase]) if self.fake else None
            with self.label("activations"):
                out = fn(module, *args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            self.proto[shapes] = (isinstance(out, tuple), [(t.shape, t.dtype, t.requires_grad) for t in outs])
            return out
        return forward

    def decoder_init(self, dec, model, batch, cache_len, dtype):
        """decoder.StaticDecoder: its weight copies and KV cache labelled, their bytes kept for the roofline."""
        with self.label("decoder weight copies"):
            self.orig["decoder_init"](dec, model, batch, cache_len, dtype)
        if self.fake:
            self.tracker.relabel(dec.k + dec.v + [dec.valid], "KV cache")
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        dec.kv_bytes = nbytes(dec.k + dec.v)
        dec.w_bytes = nbytes([t for layer in dec.w for wb in layer for t in wb] + list(dec.lm_head))
        dec.seen_windows, dec.window_flops = {}, {}

    def decoder_step(self, dec, window):
        """One decode step: on CUDA a graph per window of 128 slots (each keeping its output in the graph pool)."""
        cache_len = dec.k[0].shape[2]
        if self.cuda:
            window = min(cache_len, -(-window // 128) * 128)
        if not self.fake:
            return self.orig["decoder_step"](dec, window)
        start = self.tracker.flops[self.tracker.phase]
        try:
            return self.skip_or_step(dec, window, cache_len)
        finally:  # a decode step reads the weight copies and the window's keys and values: its roofline terms
            self.decode.append((self.tracker.flops[self.tracker.phase] - start,
                                dec.w_bytes + dec.kv_bytes * window / cache_len))

    def skip_or_step(self, dec, window, cache_len):
        """Run a decode step for a new window (the first two, and the last); else add its FLOPs and reuse an output."""
        tr = self.tracker
        if window not in dec.seen_windows and (len(dec.seen_windows) < 2 or window >= cache_len - 1):
            start = tr.flops[tr.phase]
            with self.label("rollout: logits and sampling"):
                out = self.orig["decoder_step"](dec, window)
            dec.window_flops[window] = tr.flops[tr.phase] - start
            dec.seen_windows[window] = out if self.cuda else None
            return out
        if window in dec.window_flops:
            tr.count(dec.window_flops[window])
        else:  # a window between two that ran: attention's FLOPs are linear in the window
            (w1, f1), (w2, f2) = sorted(dec.window_flops.items())[:2]
            tr.count(f1 + (window - w1) * (f2 - f1) / (w2 - w1))
        if self.cuda:
            return dec.seen_windows[window] if window in dec.seen_windows else torch.zeros_like(
                dec.seen_windows[next(iter(dec.seen_windows))])
        with self.label("rollout: logits and sampling"):
            return torch.zeros(dec.tokens.shape[0], dec.lm_head[0].shape[0], dtype=torch.float32)

    def optimizer_step_pre(self, opt, args, kwargs):
        self.close_open()
        if self.fake:
            self.saved_label, self.tracker.label = self.tracker.label, "optimizer state"

    def optimizer_step_post(self, opt, args, kwargs):
        self.steps += 1
        if self.fake:
            self.tracker.label = self.saved_label
            self.tracker.relabel([t for s in opt.state.values() for t in s.values()], "optimizer state")


def as_method(fn):
    """fn(obj, ...) as a function a class can hold: calling it on an instance passes the instance as obj."""
    return lambda obj, *args, **kwargs: fn(obj, *args, **kwargs)


def run_step(name, flags, shape="qwen2.5-1.5b", gpus=1, cuda=True, prompt_len=248, fake=True):
    """Trainer `name`'s one step with `flags` at `shape` as rank 0 of `gpus` DDP ranks: a Prediction, run."""
    return Prediction(name, flags, shape, gpus, cuda, prompt_len, fake).run()


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
