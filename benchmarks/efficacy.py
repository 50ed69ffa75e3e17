"""Efficacy over seeds: the base model, IRPO and STaR on the CPU default, each figure with a 95% interval.

    .venv/bin/python benchmarks/efficacy.py [--recipes base,irpo,star] [--seeds 3] [--out runs/efficacy]
                                            [key=value ...]

1. Runs: for each seed s and each trained recipe r, `selfimprove run <r's CPU config> task.seed=s rollout.seed=s
   train.seed=s run_dir=<out>/<r>-seed<s>` plus the overrides given (`CONFIGS`: IRPO is `configs/local.yaml`, the
   CPU default, and each baseline the config measured beside it). So the generated problems,
   the samples and the training order all change with the seed. A run that evaluated its last iteration is read
   (its eval folders are all the table needs), and one stopped part-way resumes where it stopped: the table can
   be built over several sessions.
2. The base model is iteration 0 of each seed's runs (the first trained recipe's), evaluated on that seed's
   held-out problems.
3. Per recipe and iteration, on the task's val split (`eval.split`), its test split and each `eval.extra` set
   (out of domain, GSM8K): mean greedy pass@1 over seeds and problems with its 95% interval, and the gain over
   the base with its interval, paired by seed and problem (`selfimprove/intervals.py`: the bootstrap over seeds,
   then problems within each). Nothing here chooses a knob; choose on val, state gains on test.
4. The last line is `<recipe>_gain=<mean> [<low>, <high>]`: the first trained recipe's gain in pass@1 points at
   its last iteration, on the task's test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"irpo": "local.yaml", "star": "local-star.yaml", "dpo": "local-dpo.yaml", "sipf": "local-sipf.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="base,irpo,star", help="base and/or trained recipes, comma-separated")
    ap.add_argument("--seeds", type=positive, default=3, help="seeds 0..S-1")
    ap.add_argument("--out", default=str(ROOT / "runs" / "efficacy"), help="folder of the runs")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. iterations=1")
    args = ap.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    trained = [r for r in recipes if r != "base"]
    if not trained:
        ap.error("--recipes needs a trained recipe (irpo, star, ...): the base model is each run's iteration 0")
    if unknown := [r for r in trained if r not in CONFIGS]:
        ap.error(f"no CPU config for {', '.join(unknown)}: the recipes are base, {', '.join(CONFIGS)}")
    out = Path(args.out)
    runs = {(r, s): out / f"{r}-seed{s}" for r in trained for s in range(args.seeds)}
    for (recipe, seed), run_dir in runs.items():
        command = [sys.executable, "-m", "selfimprove", "run", str(ROOT / "configs" / CONFIGS[recipe]),
                   f"task.seed={seed}", f"rollout.seed={seed}", f"train.seed={seed}", f"run_dir={run_dir}",
                   *args.overrides]
        if finished(run_dir):
            print(f"== {recipe}, seed {seed}: {run_dir} has evaluated its last iteration: read as it is", flush=True)
            continue
        print(f"== {recipe}, seed {seed}: {' '.join(command[2:])}", flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            raise SystemExit(f"efficacy: the {recipe} run of seed {seed} failed ({run_dir}); rerun to resume it")

    from selfimprove.intervals import gain_interval, mean_interval

    seeds = range(args.seeds)
    base = {s: outcomes(runs[trained[0], s], 0) for s in seeds}
    lines, last = ["| recipe | iteration | set | pass@1 [95%] | gain over base [95%] |", "|---|---|---|---|---|"], None
    for set_name in base[0]:
        mean, low, high = mean_interval([base[s][set_name] for s in seeds])
        lines.append(f"| base | 0 | {set_name} | {mean:.3f} [{low:.3f}, {high:.3f}] | |")
    for recipe in trained:
        iterations = sorted(int(p.name.removeprefix("iter_")) for p in runs[recipe, 0].glob("iter_*"))
        for t in (t for t in iterations if t > 0):
            after = {s: outcomes(runs[recipe, s], t) for s in seeds}
            for set_name in base[0]:
                mean, low, high = mean_interval([after[s][set_name] for s in seeds])
                gain = gain_interval([base[s][set_name] for s in seeds], [after[s][set_name] for s in seeds])
                lines.append(f"| {recipe} | {t} | {set_name} | {mean:.3f} [{low:.3f}, {high:.3f}] | "
                             f"{100 * gain[0]:+.1f} [{100 * gain[1]:+.1f}, {100 * gain[2]:+.1f}] points |")
                if recipe == trained[0] and set_name == "test":
                    last = f"{recipe}_gain={100 * gain[0]:+.1f} [{100 * gain[1]:+.1f}, {100 * gain[2]:+.1f}]"
    print(f"{args.seeds} seeds; {', '.join(f'{r} ({CONFIGS[r]})' for r in trained)}; {' '.join(args.overrides)}")
    print("\n".join(lines))
    print(last or f"{trained[0]}_gain: the runs scored no test split (eval.test=false)")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def finished(run_dir: Path) -> bool:
    """Whether the run evaluated its last iteration: then only its evals are read, so a table can be rebuilt from
    the runs' eval folders alone (kept where the models are not)."""
    import yaml

    config = run_dir / "config.yaml"
    last = config.is_file() and yaml.safe_load(config.read_text()).get("iterations")
    return bool(last) and (run_dir / f"iter_{last}" / "eval" / "metrics.json").is_file()


def outcomes(run_dir: Path, t: int) -> dict[str, list[int]]:
    """Iteration t's greedy outcomes per held-out problem (sorted by problem id): on the split the run's evals
    score first (named by it: "val") and on each of the report's sets ("test", then `eval.extra`'s)."""
    from selfimprove.evaluate import problem_results
    from selfimprove.io import read_table

    evaluated = run_dir / f"iter_{t}" / "eval"
    if not (evaluated / "metrics.json").is_file():
        raise SystemExit(f"efficacy: {evaluated} has no metrics.json: the run has not evaluated iteration {t}")
    scored = json.loads((evaluated / "metrics.json").read_text())
    sets = {scored["metrics"]["split"]: scored["problems"]}
    for name in scored["metrics"].get("extra", {}):
        sets[name] = problem_results(read_table(evaluated / "extra" / name / "samples").to_pylist())
    return {name: [int(r["greedy_correct"]) for r in sorted(rows, key=lambda r: r["id"])]
            for name, rows in sets.items()}


if __name__ == "__main__":
    main()
