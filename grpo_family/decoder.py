"""
decoder.py: the two decoding paths rollout.generate takes: Hugging Face generate(), and the fast
rollout, its sampling from a hand-written decode loop with a static KV cache (fast=True; nanochat
keeps its engine.py apart the same way).

    hf_generate      Hugging Face generate() with exactly our sampling: the readable path
    check_model      raise unless the model is a Qwen2/Llama-style decoder this loop supports
    StaticDecoder    prefill and one-token decode steps over a preallocated KV cache (+ CUDA graphs)
    sampling_logits  temperature and top-p, as generate()'s warpers apply them (log_softmax = log μ)
    sample_tokens    the next tokens, drawn exactly as Hugging Face generate() draws them
    SamplerLogprobs  a logits processor that records log μ of the tokens generate() draws
    fast_decode      the decode loop: (B, T) completion ids, optionally their log-probs

Hugging Face generate() spends a decode step mostly in Python (cache and mask bookkeeping, logits
processors, stopping criteria) and, under bf16 autocast, re-casts every fp32 weight on every step.
This loop runs the decoder of a Qwen2/Llama-style model from bf16 copies of its weights made once
per rollout, runs each prompt through the model once for its whole group, writes keys and values
into a cache allocated once, and on CUDA replays each one-token step as a CUDA graph.
It mirrors the plain path: the numerics of autocast (fp32 residual stream and RMSNorm, bf16 matmuls
and attention; plain fp32 on CPU), left-padded prompts with positions counted from the first real
token, tokens drawn as generate() draws them (temperature, then top-p, then the exponential race
torch.multinomial runs for one sample, so the same seed gives the same tokens), the pad token after
EOS, and a stop once every row has ended.
"""
import torch
import torch.nn.functional as F

from grpo_family import lora

ARCHS = ("qwen2", "llama")


def check_model(model):
    """Raise NotImplementedError, saying why, unless the fast rollout supports this model."""
    cfg, base = model.config, model.base_model
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    problems = []
    if getattr(cfg, "model_type", None) not in ARCHS:
        problems.append(f"model_type {getattr(cfg, 'model_type', None)!r} (supported: {', '.join(ARCHS)})")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if rope is None or rope in ("dynamic", "longrope"):  # these rescale with the sequence length
        problems.append(f"rotary embedding type {rope!r}")
    if problems:
        raise NotImplementedError(f"fast rollout does not support {'; '.join(problems)}: "
                                  "use the plain path (fast=False, --fast_rollout=false)")


def _rms_norm(x, norm):
    """A Hugging Face (Qwen2/Llama) RMSNorm module's output, as one fused op: w * x / rms(x), in fp32 for fp32 x."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _linear(x, wb):
    """x @ W^T + b for a (weight, bias-or-None) pair."""
    return F.linear(x, wb[0], wb[1])


class StaticDecoder:
    """Prefill and one-token decode steps of a Qwen2/Llama-style decoder over a preallocated KV cache.

    dtype is the matmul and attention dtype (bf16 on CUDA, like autocast); the residual stream,
    RMSNorm and rotary tables stay in the embedding's dtype (fp32 master weights), as under autocast.
    """

    def __init__(self, model, batch, cache_len, dtype):
        base, cfg = model.base_model, model.config
        self.base, self.dtype = base, dtype
        emb = base.embed_tokens.weight
        attn = base.layers[0].self_attn
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = attn.head_dim
        self.scale = getattr(attn, "scaling", self.hd ** -0.5)

        def fuse(*lins):  # (weight, bias) of one matmul for several projections, in `dtype`, LoRA merged in
            wbs = [lora.linear_weight(l) for l in lins]
            ws = [w.detach().to(dtype) for w, _ in wbs]
            if all(b is None for _, b in wbs):
                return (torch.cat(ws) if len(ws) > 1 else ws[0]), None
            bs = [(b.detach() if b is not None else w.new_zeros(w.shape[0])).to(dtype) for w, b in wbs]
            return (torch.cat(ws), torch.cat(bs)) if len(ws) > 1 else (ws[0], bs[0])
        self.w = [(fuse(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), fuse(l.self_attn.o_proj),
                   fuse(l.mlp.gate_proj, l.mlp.up_proj), fuse(l.mlp.down_proj)) for l in base.layers]
        self.mods = [(l.input_layernorm, l.post_attention_layernorm, l.mlp.act_fn) for l in base.layers]
        self.lm_head = fuse(model.get_output_embeddings())
        shape = (batch, self.Hkv, cache_len, self.hd)
        # zeros, not empty: an unfilled slot is masked out, and 0 * garbage could be NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=emb.device) for _ in base.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=emb.device) for _ in base.layers]
        self.valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=emb.device)  # slot holds a real token
        positions = torch.arange(cache_len, device=emb.device)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=emb.dtype, device=emb.device), positions)
        # Hugging Face rotates as x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1);
        # that is exactly x * cos + x.roll(hd/2) * (sin with its first half negated), in fewer ops.
        sign = torch.ones(self.hd, dtype=emb.dtype, device=emb.device)
        sign[:self.hd // 2] = -1
        self.cos, self.sin = cos[0], sin[0] * sign                            # (cache_len, hd)
        # the inputs of one decode step, updated in place (a CUDA graph reads them by address)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=emb.device)  # token fed this step
        self.pos = torch.zeros(batch, dtype=torch.long, device=emb.device)     # its rotary position
        self.col = torch.zeros(1, dtype=torch.long, device=emb.device)         # its cache slot
        self.graphs, self.pool = {}, None

    def _layer(self, i, x, cos, sin, attend):
        """Decoder layer i on the residual stream x (B, S, D); attend(i, q, k, v) caches k, v and attends."""
        (norm1, norm2, act), (wqkv, wo, wgu, wd) = self.mods[i], self.w[i]
        B, S, _ = x.shape
        H, Hkv = self.H, self.Hkv
        h = _rms_norm(x, norm1).to(self.dtype)
        qkv = _linear(h, wqkv).view(B, S, H + 2 * Hkv, self.hd).transpose(1, 2)  # (B, H + 2 Hkv, S, hd)
        qk = qkv[:, :H + Hkv]
        qk = (qk * cos + qk.roll(self.hd // 2, -1) * sin).to(self.dtype)  # rotary in the residual dtype, as autocast
        x = x + _linear(attend(i, qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]), wo)
        gate, up = _linear(_rms_norm(x, norm2).to(self.dtype), wgu).chunk(2, dim=-1)
        return x + _linear(act(gate) * up, wd)

    def _logits(self, x):
        """(B, V) fp32 logits from the last residual state (B, D)."""
        return _linear(_rms_norm(x, self.base.norm).to(self.dtype), self.lm_head).float()

    def prefill(self, ids, mask, group_size=1):
        """Run left-padded prompts (n, P) through the model once, into cache slots [0, P) of each
        prompt's group_size consecutive rows; (n * group_size, V) logits of the last prompt token."""
        n, P = ids.shape
        pos = (mask.cumsum(1) - 1).clamp_min(0)                              # positions skip the left padding
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]            # (n, 1, P, hd)
        self.valid[:, :P] = mask.bool().repeat_interleave(group_size, 0)
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        allowed = (causal & (mask.bool()[:, None, :] | eye))[:, None]       # (n, 1, P, P); a pad sees itself only
        rep = self.H // self.Hkv

        def attend(i, q, k, v):
            for cache, new in ((self.k[i], k), (self.v[i], v)):  # each group's rows share the prompt's keys
                cache.view(n, group_size, *cache.shape[1:])[:, :, :, :P] = new[:, None]
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               attn_mask=allowed, scale=self.scale)
            return o.transpose(1, 2).reshape(n, P, self.H * self.hd)

        x = self.base.embed_tokens(ids)
        for i in range(len(self.w)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x[:, -1]).repeat_interleave(group_size, 0)

    def step(self, window):
        """Feed self.tokens at self.pos into cache slot self.col; logits (B, V), attending to slots [0, window)."""
        B = self.tokens.shape[0]
        self.valid.index_fill_(1, self.col, True)
        mask = self.valid[:, None, None, :window]                            # (B, 1, 1, window)
        cos, sin = self.cos[self.pos][:, None, None], self.sin[self.pos][:, None, None]  # (B, 1, 1, hd)
        rep = self.H // self.Hkv

        def attend(i, q, k, v):
            self.k[i].index_copy_(2, self.col, k)
            self.v[i].index_copy_(2, self.col, v)
            # grouped-query attention without copying the cache: the `rep` query heads that share
            # a KV head become `rep` query rows against it (query head h uses KV head h // rep)
            o = F.scaled_dot_product_attention(q.reshape(B, self.Hkv, rep, self.hd), self.k[i][:, :, :window],
                                               self.v[i][:, :, :window], attn_mask=mask, scale=self.scale)
            return o.reshape(B, 1, self.H * self.hd)

        x = self.base.embed_tokens(self.tokens)[:, None]
        for i in range(len(self.w)):
            x = self._layer(i, x, cos, sin, attend)
        return self._logits(x[:, 0])

    def graphed_step(self, window):
        """step(window) as a CUDA graph: captured on first use of each window, then replayed."""
        if window not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS and attention workspaces)
                for _ in range(2):
                    eager = self.step(window)  # a step is idempotent: it rewrites the same slot
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()  # graphs replay one at a time: share memory
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(window)
            graph.replay()
            err, scale = (out - eager).abs().max().item(), eager.abs().max().item()
            if not err <= 0.05 * scale + 1e-3:
                raise RuntimeError(f"CUDA graph replay of the decode step differs from eager (max |diff| {err:.3g} "
                                   f"vs max |logit| {scale:.3g}); use the plain path (--fast_rollout=false) "
                                   "or fast_decode(cuda_graphs=False)")
            self.graphs[window] = (graph, out)
        graph, out = self.graphs[window]
        graph.replay()
        return out


def hf_generate(model, ids, mask, max_new_tokens, eos, pad_id, temperature=1.0, top_p=1.0, greedy=False,
                return_logprobs=False):
    """(B, T) completion ids from Hugging Face generate(), the readable path the fast loop must match, and with
    return_logprobs their (B, T) log-probs under the sampling distribution (SamplerLogprobs), else None."""
    from transformers import GenerationConfig
    # A fresh GenerationConfig, so a model's own defaults (top_k, repetition_penalty) never leak
    # in: the sampling distribution must be exactly softmax(logits / temperature), top-p cut.
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=0 if not greedy else None, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=pad_id, repetition_penalty=1.0)
    rec = SamplerLogprobs(temperature, 1.0 if greedy else top_p) if return_logprobs else None
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                         logits_processor=[rec] if rec else None)[:, ids.shape[1]:]
    return out, (rec.finish(out) if rec else None)


def sampling_logits(logits, temperature, top_p):
    """fp32 logits (B, V) -> the logits tokens are drawn from: temperature, then the top-p cut (-inf outside),
    Hugging Face's TemperatureLogitsWarper and TopPLogitsWarper line for line. log_softmax of them is log μ,
    the sampler's own log-probs (the rollout-correction weights compare them with the trainer's)."""
    if temperature != 1.0:                                 # TemperatureLogitsWarper
        logits = logits / temperature
    if top_p < 1.0:                                        # TopPLogitsWarper
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return logits


def sample_tokens(logits, temperature, top_p, greedy):
    """(B,) next tokens from fp32 logits (B, V), drawn exactly as Hugging Face generate() draws them."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(sampling_logits(logits, temperature, top_p), dim=-1)
    # torch.multinomial(probs, 1) computes exactly this (an exponential race, argmax of p / E),
    # after validity checks over all of probs (a host sync in older torch versions); fast_decode
    # checks the drawn tokens' logits instead, once per rollout.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


class SamplerLogprobs:
    """A logits processor for Hugging Face generate() that records log μ of each drawn token (the plain path's
    return_logprobs). Custom processors run before generate's own warpers, so it applies them itself; at step t
    it reads the token drawn at t - 1, and finish() reads the last one. Memory: one (B, V) block."""

    def __init__(self, temperature, top_p):
        self.temperature, self.top_p, self.steps, self.last = temperature, top_p, [], None

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.steps.append(self.last.gather(1, input_ids[:, -1:])[:, 0])
        self.last = torch.log_softmax(sampling_logits(scores.float(), self.temperature, self.top_p), -1)
        return scores

    def finish(self, completion_ids):
        """(B, T) log-probs of the drawn tokens (T = completion_ids.shape[1])."""
        if completion_ids.shape[1]:
            self.steps.append(self.last.gather(1, completion_ids[:, -1:])[:, 0])
        if not self.steps:  # no token was drawn
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float)
        return torch.stack(self.steps, 1)


@torch.no_grad()
def fast_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos, pad_id, temperature=1.0, top_p=1.0,
                greedy=False, group_size=1, cuda_graphs=None, window_multiple=None, return_logprobs=False, dtype=None):
    """(B, T) completions of left-padded prompts (pad after EOS, T trimmed as generate() trims it), and
    their (B, T) log-probs log μ under the sampling distribution (temperature, top-p cut) if return_logprobs.

    Each of the n prompt rows is sampled group_size times, in consecutive rows (B = n * group_size,
    the order of generate()'s repeat_interleave); the prompt itself goes through the model once.

    cuda_graphs (default: on for CUDA) replays each decode step as a CUDA graph; a graph needs a
    fixed attention length, so steps attend to the cache in windows of window_multiple slots
    (default 128 with graphs, else 1 = exactly the filled slots), unfilled slots masked out.
    dtype: of the weight copies, matmuls and attention (default bf16 on CUDA, the weights' own elsewhere).
    """
    check_model(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = prompt_ids.device
    cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
    m = window_multiple or (128 if cuda_graphs else 1)
    B, P = prompt_ids.shape[0] * group_size, prompt_ids.shape[1]
    cache_len = -(-(P + max_new_tokens) // m) * m
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and P + max_new_tokens > limit:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings={limit}")
    dtype = dtype or model.get_input_embeddings().weight.dtype  # rollout.generate passes bf16 under cuda_numerics
    check_every = 16 if device.type == "cuda" else 1       # steps between host syncs on "all rows ended?"
    eos_t = torch.tensor(eos, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
    finite = torch.ones((), dtype=torch.bool, device=device)
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    with torch.autocast(device.type, enabled=False):       # the decoder casts explicitly, as autocast would
        dec = StaticDecoder(model, B, cache_len, dtype)
        dec.pos.copy_((prompt_mask.sum(1) - 1).repeat_interleave(group_size))
        dec.col.fill_(P - 1)
        for t in range(max_new_tokens):
            if t == 0:
                logits = dec.prefill(prompt_ids, prompt_mask, group_size)
            else:
                window = min(cache_len, -(-(P + t) // m) * m)  # slots 0 .. P+t-1 are filled
                logits = dec.graphed_step(window) if cuda_graphs else dec.step(window)
            z = sampling_logits(logits, temperature, top_p) if return_logprobs or not greedy else None
            nxt = logits.argmax(-1) if greedy else sample_tokens(z, 1.0, 1.0, False)  # (B,), as generate() draws
            # a NaN or inf logit makes the drawn token's logit non-finite (argmax picks NaN): O(B) check
            finite &= torch.isfinite(logits.gather(1, nxt[:, None])).all()
            if return_logprobs:
                logps[:, t] = torch.log_softmax(z, -1).gather(1, nxt[:, None])[:, 0]
            nxt = nxt * unfinished + pad_id * (1 - unfinished)                   # pad after EOS
            out[:, t] = nxt
            unfinished = unfinished & ~torch.isin(nxt, eos_t)
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and not unfinished.any()):
                break
            dec.tokens.copy_(nxt)
            dec.pos += 1
            dec.col += 1
    if not finite:
        raise FloatingPointError("fast rollout produced non-finite logits (check the model weights)")
    T = t + 1
    if not unfinished.any():  # generate() stops right after the step where the last row ended
        ended = torch.isin(out[:, :T], eos_t)
        T = int(ended.int().argmax(1).max()) + 1                             # the latest first EOS
    return out[:, :T], (logps[:, :T] if return_logprobs else None)
