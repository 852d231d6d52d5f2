"""
grpo_family: the plumbing every trainer calls, and nothing a reader needs to diff. The algorithms live in the
trainer files at the repository's root; each imports the rooms it uses, all with one line:

    from grpo_family import checkpoint, config, distributed, evaluation, gsm8k, loading, logprobs, logs, rollout

In the order a trainer's loop calls them:
    config          the command line: a typed dataclass, --key=value flags, --tiny, --help, one-line errors
    distributed     processes and devices: torchrun's process group, DDP or --fsdp, the collectives, numerics
    checkpoint      run dirs, checkpoints and --resume
    loading         the models (policy, reference) and tokenizer, the problems and each step's prompts
    rollout         G sampled completions per prompt, their rewards, the sampler-vs-π_old correction
    logprobs        per-token log-probs and entropies of completions (the module DDP wraps)
    logs            sums over micro-batches and ranks, the progress bar, metrics.jsonl
    evaluation      held-out accuracy and its statistics (the trainers' eval and eval_gsm8k.py)
The rooms beside them:
    gsm8k           the task: loading GSM8K, the chat prompt, the answer parser and the rewards
    tiny            the embedded tiny default: a task, tokenizer and model built locally (--tiny)
    decoder         the two decoding paths: Hugging Face generate() and the static-KV-cache loop
    lora            LoRA adapters (--lora_rank)
    fsdp            --fsdp: sharding with PyTorch's FSDP2
    jsonfile        the one JSON reader of every file read: a size and a depth bound, one-line errors

Imports run one way: a trainer imports these modules, and each imports only the ones below it
(config -> distributed -> fsdp; loading -> checkpoint -> logs; ...), never a trainer or a tool.
"""
