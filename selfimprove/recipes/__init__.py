"""Recipes: each a module that declares the stages of a run, and the knob values it needs.

A recipe module has `DEFAULTS` (knob values a config naming it gets unless it sets them), `check(cfg)` (what is
wrong with a config for this recipe, or None) and `plan(run)` (every stage of the run, in order). The driver runs
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
