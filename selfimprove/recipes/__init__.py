"""Recipes: each a module that declares the stages of a run, and the knob values it needs.

A recipe module has `DEFAULTS` (knob values a config naming it gets unless it sets them), `check(cfg)` (what is
wrong with a config for this recipe, or None) and `plan(run)` (every stage of the run, in order); `ROLES`, the
models it uses, and `NEEDS_GOLD`, whether its training problems need answers, if they differ from the loop
recipes' (policy and reference; yes). The driver resolves a config's recipe once (`recipe_of`) and runs its
plan; progress, resume, input fingerprints and the metrics all read it, and nothing else lists stages.

A config is loaded here (`load_config`): its recipe's defaults go under its own keys, and its recipe's checks run
after the knobs' own (`check`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfimprove.config import RECIPE_NAMES, Config, build_config, check_knobs, overlay, read_config
from selfimprove.errors import UserError
from selfimprove.train.loss_names import needs_reference, needs_rejected


@dataclass(frozen=True)
class Recipe:
    """A recipe module's parts, looked up once and passed to what reads them."""

    name: str
    defaults: dict
    check: Callable[[Config], str | None]
    plan: Callable[[Any], list]  # Run -> list[Stage] (selfimprove/recipes/stages.py)
    roles: tuple[str, ...] = ("policy", "reference")
    needs_gold: bool = True


def recipe(name: str) -> Recipe:
    module = importlib.import_module(f"selfimprove.recipes.{name}")
    return Recipe(name, module.DEFAULTS, module.check, module.plan, getattr(module, "ROLES", Recipe.roles),
                  getattr(module, "NEEDS_GOLD", Recipe.needs_gold))


def recipe_of(cfg: Config) -> Recipe:
    return recipe(name_of(cfg))


def name_of(cfg: Config) -> str:
    """The config's recipe; a config that names none (as configs did before recipes) gets the one its knobs
    describe: process pairs are SIPF, SFT rows STaR, a DPO or IPO loss DPO, any other preference loss IRPO."""
    if cfg.recipe:
        return cfg.recipe
    if cfg.pairs.source == "process":
        return "sipf"
    return {"sft": "star", "dpo": "dpo", "ipo": "dpo"}.get(cfg.train.loss, "irpo")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults when path is None) plus `a.b=value` overrides, over the knob values of
    the recipe it names; checked (`check`)."""
    raw, where = read_config(path, overrides)
    if raw.get("recipe") in RECIPE_NAMES:  # the recipe's knob values, under the ones the config sets
        raw = overlay(recipe(raw["recipe"]).defaults, raw)
    cfg = build_config(raw, where)
    check(cfg, where)
    return cfg


def check(cfg: Config, where: str = "config") -> None:
    """Refuse a combination of knobs that each pass their own check, or that the recipe cannot run with (a config
    built in code skips `load_config`)."""
    check_knobs(cfg, where)
    r = recipe_of(cfg)
    if problem := _loss_problem(cfg) or role_problem(cfg, r) or r.check(cfg):
        raise UserError(f"{where}: {problem}")


def _loss_problem(cfg: Config) -> str | None:
    if cfg.pairs.source == "process" and not needs_rejected(cfg.train.loss):
        return (f"pairs.source=process builds preference pairs, which train.loss={cfg.train.loss} does not "
                "read; use a preference loss such as train.loss=orpo")
    return None


def role_problem(cfg: Config, r: Recipe) -> str | None:
    """A model role the config gives that its recipe `r` does not use, or None."""
    if (cfg.models.teacher or cfg.teacher.data) and "teacher" not in r.roles:
        return (f"recipe {r.name} has no teacher: models.teacher and teacher.data are read by recipes self_refine "
                "and sgft")
    if cfg.models.solver and "solver" not in r.roles:
        return f"recipe {r.name} has no solver: models.solver is read by recipe sgft"
    if cfg.models.reference and not needs_reference(cfg.train.loss):
        return f"models.reference is a DPO reference, which train.loss={cfg.train.loss} does not use"
    return None
