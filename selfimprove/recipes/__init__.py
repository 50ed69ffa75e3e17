"""Recipes: each a module that declares the stages of a run, and the knob values it needs.

A recipe module has `DEFAULTS` (knob values a config naming it gets unless it sets them), `check(cfg)` (what is
wrong with a config for this recipe, or None) and `plan(run)` (every stage of the run, in order); `ROLES`, the
models it uses, and `NEEDS_GOLD`, whether its training problems need answers, if they differ from the loop
recipes' (policy and reference; yes). The driver runs
that plan; progress, resume, input fingerprints and the metrics all read it, and nothing else lists stages.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def recipe(name: str) -> ModuleType:
    return importlib.import_module(f"selfimprove.recipes.{name}")


def name_of(cfg) -> str:
    """The config's recipe; a config that names none (as configs did before recipes) gets the one its knobs
    describe: process pairs are SIPF, SFT rows STaR, a DPO or IPO loss DPO, any other preference loss IRPO."""
    if cfg.recipe:
        return cfg.recipe
    if cfg.pairs.source == "process":
        return "sipf"
    return {"sft": "star", "dpo": "dpo", "ipo": "dpo"}.get(cfg.train.loss, "irpo")


def roles(name: str) -> tuple[str, ...]:
    return getattr(recipe(name), "ROLES", ("policy", "reference"))


def needs_gold(name: str) -> bool:
    return getattr(recipe(name), "NEEDS_GOLD", True)


def role_problem(cfg) -> str | None:
    """A model role the config gives that its recipe does not use, or None."""
    from selfimprove.train.loss_names import needs_reference

    name = name_of(cfg)
    if (cfg.models.teacher or cfg.teacher.data) and "teacher" not in roles(name):
        return (f"recipe {name} has no teacher: models.teacher and teacher.data are read by recipes self_refine "
                "and sgft")
    if cfg.models.solver and "solver" not in roles(name):
        return f"recipe {name} has no solver: models.solver is read by recipe sgft"
    if cfg.models.reference and not needs_reference(cfg.train.loss):
        return f"models.reference is a DPO reference, which train.loss={cfg.train.loss} does not use"
    return None
