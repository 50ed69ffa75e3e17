"""Self-Refine Instruction-Tuning (Ranaldi & Freitas, 2024): a teacher's demonstrations tune the student, which
then refines itself on preference pairs judged against the teacher's labels.

1. Iteration 0 evaluates the student, and the teacher when it is a model (stage `teacher_eval`).
2. Iteration 1 is instruction-tuning: the teacher's demonstrations (`demos`: sampled through the rollout pool,
   or read from `teacher.data`), each training question's label and the demonstrations that reach it
   (`labels`: the gold answer, or the teacher's majority for a question-only task), then SFT of the student.
3. Iterations 2 .. iterations + 1 are the self-refine rounds: the last model samples the labelled questions,
   a sample that agrees with the label beats one that does not (outcome pairs; with `pairs.include_gold`, a
   question's gold chain of thought, or its first demonstration, is a winner too), and `train.loss` (DPO)
   trains it with itself as the reference.
"""

from selfimprove.recipes import stages
from selfimprove.recipes.stages import Run, Stage
from selfimprove.train.loss_names import needs_rejected

DEFAULTS = {"train": {"loss": "dpo"}, "pairs": {"source": "outcome"}}
ROLES = ("policy", "reference", "teacher")
NEEDS_GOLD = False  # the teacher's majority labels questions that come without answers


def check(cfg) -> str | None:
    if not cfg.models.teacher and not cfg.teacher.data:
        return "recipe self_refine needs a teacher: set models.teacher (a model) or teacher.data (a demonstrations file)"
    if cfg.models.teacher and cfg.teacher.data:
        return "recipe self_refine takes its demonstrations from models.teacher or from teacher.data: give one of them"
    if cfg.pairs.source != "outcome" or not needs_rejected(cfg.train.loss):
        return (f"recipe self_refine's rounds train outcome pairs: it needs pairs.source=outcome and a preference "
                f"train.loss (dpo, rpo, ipo or orpo), got pairs.source={cfg.pairs.source} and train.loss={cfg.train.loss}")
    return None


def plan(run: Run) -> list[Stage]:
    cfg, model = run.cfg, run.policy
    out = [stages.evaluate(run, 0, model)]
    if run.teacher is not None:
        out.append(stages.evaluate(run, 0, run.teacher, "teacher_eval", cfg.models.teacher))
    demos = stages.demonstrations(run, 1)
    labels = stages.labels(run, 1, demos.folder)
    out += [demos, labels, stages.train(run, 1, model, labels.folder, loss="sft")]
    model = stages.trained_model(out[-1])
    out.append(stages.evaluate(run, 1, model))
    schedule = cfg.rollout.temperature_schedule
    for t in range(2, cfg.iterations + 2):
        out.append(stages.rollout(run, t, model, problems=labels.folder,
                                  temperature=schedule[t - 2] if schedule else None))
        out.append(stages.pairs(run, t, problems=labels.folder))
        out.append(stages.train(run, t, model, out[-1].folder))
        model = stages.trained_model(out[-1])
        out.append(stages.evaluate(run, t, model))
    return out
