"""
tools: what you run that is not a trainer, for teachers and maintainers. Run each from the repository's root:

    python -m tools.memory grpo --gpus=2      will it fit: a trainer's own step on fake tensors at the real shape
    python -m tools.fsdp_memory               --fsdp's per-GPU memory arithmetic (docs/fsdp.md's table)
    python -m tools.explain --tiny            every trainer's gradient weight on each token, as a page and a picture
    python -m tools.compare                   the family side by side on the tiny default (3 seeds each)
    python -m tools.bench --tiny              a GRPO step's phases timed; the fast rollout against generate()
    python -m tools.token_lengths --tokenizer=DIR   GSM8K's prompt and solution lengths in a tokenizer's tokens
    python -m tools.diffguide                 the generated `diff grpo.py X.py` blocks in docs/X.md
    python -m tools.exercise --trainers=grpo  a student's copy: the algorithm's bodies blanked, graded by its tests
    python -m tools.ablations                 the course's GRPO ablations on the tiny default: runs, table, plot
    python -m tools.lock check --installed    does this environment hold exactly requirements.lock
    tools/gpu_check.sh                        the GPU check: one call, one report (--cpu: the same at tiny shape)

Shared by them: trainers.py (the list of trainers, their markers and diff budgets) and harness.py (one step of a
trainer's own main() with the plumbing around it replaced: what memory and explain run).
"""
