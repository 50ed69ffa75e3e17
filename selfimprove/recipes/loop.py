"""The loop IRPO, STaR, DPO and SIPF share: sample, (score steps,) build training rows, train, evaluate.

1. Iteration 0 only evaluates the starting model. Iteration t >= 1 samples from model t-1, which is
   also its reference, as Iterative RPO does; its trained model is model t.
2. With process pairs (SIPF), a process stage scores each sample's steps. With `process.scorer=trained`,
   iterations up to `process.prm_mc_iterations` score by Monte Carlo; the last of them then trains a PRM
   on all their step values (stage `prm`), and every later iteration scores with that PRM.
3. With `pairs.accumulate`, iteration t trains on its rows plus all earlier iterations' (D_t = D_t-1 + new).
4. Iteration t's eval and iteration t+1's rollout sample the same model: with `rollout.draw_ahead` the eval's
   engines draw both, and the rollout copies its samples from the eval's folder.
"""

from __future__ import annotations

from selfimprove.recipes import stages
from selfimprove.recipes.stages import Run, Stage


def plan(run: Run) -> list[Stage]:
    cfg, model = run.cfg, run.policy
    out = [stages.evaluate(run, 0, model, ahead=_next_rollout(run, 0, model))]
    for t in range(1, cfg.iterations + 1):
        out.append(stages.rollout(run, t, model, drawn_in=run.iteration(t - 1) / "eval"))
        if cfg.pairs.source == "process":
            out.append(stages.process(run, t, model, _prm(run, t)))
            if cfg.process.scorer == "trained" and t == cfg.process.prm_mc_iterations:
                out.append(stages.train_prm(run, t, list(range(1, t + 1))))
        previous = run.iteration(t - 1) / "pairs" if cfg.pairs.accumulate and t > 1 else None
        out.append(stages.pairs(run, t, previous))
        out.append(stages.train(run, t, model, out[-1].folder))
        model = stages.trained_model(out[-1])
        out.append(stages.evaluate(run, t, model, ahead=_next_rollout(run, t, model)))
    return out


def _next_rollout(run: Run, t: int, model) -> Stage | None:
    """Iteration t+1's rollout, which samples the model iteration t evaluates: its eval draws it ahead."""
    return stages.rollout(run, t + 1, model) if t < run.cfg.iterations else None


def _prm(run: Run, t: int):
    """The trained PRM iteration t's process stage scores with, or None when it runs Monte Carlo."""
    p = run.cfg.process
    if p.scorer != "trained" or t <= p.prm_mc_iterations:
        return None
    return (run.iteration(p.prm_mc_iterations) / "prm" / "model").resolve()
