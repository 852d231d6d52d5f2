"""
trainers.py: the family, in one place. Every tool and test that goes over the trainers reads this list.

    TRAINERS    every trainer at the repository's root, grpo first, in README's order
    MARKERS     the tag each trainer's changed lines carry against grpo.py (`# [GSPO]`)
    BUDGETS     the most changed lines `diff -u grpo.py X.py` may have (+ and - together, docstrings included):
                the size each diff has today, so that a change that is not the algorithm's cannot grow one
    path, load  a trainer's file, and its module (imported from the repository's root)
"""
import importlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (marker, diff budget against grpo.py); dpo's grew by 1 with --entropy_coef, a flag it does not have
_FAMILY = {
    "grpo": (None, 0),
    "dapo": ("[DAPO]", 165), "gspo": ("[GSPO]", 65), "sapo": ("[SAPO]", 69), "gfpo": ("[GFPO]", 117),
    "gtpo": ("[GTPO]", 141), "ppo": ("[PPO]", 206), "dpo": ("[DPO]", 144), "drgrpo": ("[DRGRPO]", 49),
    "cispo": ("[CISPO]", 65), "rloo": ("[RLOO]", 101), "maxrl": ("[MAXRL]", 78), "gmpo": ("[GMPO]", 63),
    "gdpo": ("[GDPO]", 75), "dppo": ("[DPPO]", 75), "reinforcepp": ("[R++]", 112),
}
TRAINERS = list(_FAMILY)
MARKERS = {name: marker for name, (marker, _) in _FAMILY.items() if marker}
BUDGETS = {name: budget for name, (marker, budget) in _FAMILY.items() if marker}


def path(name):
    """The trainer's file: <root>/<name>.py."""
    return os.path.join(ROOT, f"{name}.py")


def load(name):
    """The trainer's module (its main() runs only under __main__, so importing it starts nothing)."""
    if name not in _FAMILY:
        raise KeyError(f"{name!r} is not a trainer: {', '.join(TRAINERS)}")
    return importlib.import_module(name)
