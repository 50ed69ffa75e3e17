"""Solution-Guidance Fine-Tuning (Bi et al., 2024), and a guide that goes on learning from its solver's success.

A small guide model writes solution guidance (the steps, no computed number); any solver model answers with it
in its prompt. The run's policy (`model`, or `models.guide`) is the guide; `models.solver` never changes.

1. Iteration 0 evaluates the solver alone (`solver_eval`) and the solver with the untrained guide, prompted with
   two worked examples (`eval`).
2. Iteration 1: guidance data for the training questions (`guidance`: from `models.teacher`, `teacher.data` or
   the task's structure, kept if number-free and the solver follows it to the gold answer), SFT of the guide on
   it, and the solver's evaluation with that guide. With `guide.cot_baseline`, the paper's baseline too: the
   solver fine-tuned on the gold chains of thought of the same questions (`cot_train`), evaluated alone
   (`cot_eval`).
3. Iterations 2 .. iterations + 1 are self-improvement rounds (beyond the paper): the guide samples `guide.n`
   guidances per question, the solver answers each `guide.solver_samples` times, a guidance is worth its
   success rate, and guidance pairs (a gap of `guide.min_gap`) train the guide with `train.loss`, the guide
   it starts from as the reference.
"""

from selfimprove.recipes import guided_stages, stages
from selfimprove.recipes.stages import Run, Stage
from selfimprove.train.loss_names import needs_rejected

DEFAULTS = {"train": {"loss": "rpo"}}
ROLES = ("policy", "reference", "teacher", "solver")


def check(cfg) -> str | None:
    if not cfg.models.solver:
        return "recipe sgft needs a solver: set models.solver (any model; it may be the guide's own)"
    if cfg.models.teacher and cfg.teacher.data:
        return "recipe sgft takes its guidance data from models.teacher or from teacher.data: give one of them"
    if not needs_rejected(cfg.train.loss):
        return f"recipe sgft's rounds train guidance pairs: it needs a preference train.loss, got {cfg.train.loss}"
    if cfg.guide.max_tokens + cfg.rollout.max_tokens >= cfg.rollout.max_model_len:
        return (f"guide.max_tokens={cfg.guide.max_tokens} of guidance and rollout.max_tokens={cfg.rollout.max_tokens} "
                f"of answer leave no room for the question in the solver's rollout.max_model_len="
                f"{cfg.rollout.max_model_len}")
    return None


def plan(run: Run) -> list[Stage]:
    cfg, guide, solver = run.cfg, run.policy, run.solver
    out = [stages.evaluate(run, 0, solver, "solver_eval", cfg.models.solver),
           stages.evaluate(run, 0, solver, name=cfg.models.solver, guide=guide)]
    data = guided_stages.guidance_data(run, 1)
    out += [data, stages.train(run, 1, guide, data.folder, loss="sft")]
    guide = stages.trained_model(out[-1])
    out.append(stages.evaluate(run, 1, solver, name=cfg.models.solver, guide=guide))
    if cfg.guide.cot_baseline:
        out.append(stages.train(run, 1, solver, data.folder, loss="sft", kind="cot_train", subfolder="cot"))
        out.append(stages.evaluate(run, 1, stages.trained_model(out[-1]), "cot_eval", f"{cfg.models.solver} + CoT SFT"))
    for t in range(2, cfg.iterations + 2):
        out.append(guided_stages.guided_rollout(run, t, guide))
        out.append(guided_stages.guidance_pairs(run, t))
        out.append(stages.train(run, t, guide, out[-1].folder))
        guide = stages.trained_model(out[-1])
        out.append(stages.evaluate(run, t, solver, name=cfg.models.solver, guide=guide))
    return out
