"""`sppo-fast train` and `sppo-fast plot`. Every field of `TrainConfig` is a `--field` flag whose help is
the field's documentation and what it takes (the same table validates it); `--config FILE.yaml|json` sets
many at once (flags win).

Bad input (a flag, a config file, a run directory, a data or model file) prints one line,
`sppo-fast train: error: ...`, and exits 2 before anything runs or is written; `--debug` shows the
traceback instead. SIGINT / SIGTERM stop a run cleanly (a checkpoint in RL, the warm start's progress in
its cache) and print the `--resume` command that continues it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from sppo_fast.trainer.config import TrainConfig, UserError, describe_field, field_types, load_config_file

PROG = "sppo-fast train"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError (one line, exit 2) instead of usage + message."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train a small policy with SPPO (one sample per prompt, a scalar prompt critic) or a "
                    "baseline (GRPO, DAPO, Dr. GRPO, RLOO, GSPO, SSPO, PPO) on a task with verifiable "
                    "rewards. "
                    "With no arguments: SPPO on arithmetic with a tiny Llama-style model, warm-started by "
                    "cached supervised fine-tuning. Under `torchrun --nproc_per_node K` the same command "
                    "shards the rollouts over K processes.\n\n"
                    "An --out that already holds a run is refused unless --resume (continue it) or "
                    "--overwrite (replace it) is given. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint after "
                    "the current step and prints the command that resumes the run. Bad input exits 2 with "
                    "one line naming what is wrong (--debug: with a traceback).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of field: value (flags override it)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) from its last checkpoint (a run stopped before "
                        "its first checkpoint starts again from step 0, its warm start from where it stopped); "
                        "its config.json gives the defaults, and --algo cannot change")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds (its metrics, summary and checkpoints are "
                        "deleted once the new run's input has been checked); without it such an --out is "
                        "refused")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error about bad input")
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        tp = types[f.name]
        # Strings go to TrainConfig as they are: its table parses and checks them, the same for flags and
        # config files, so that every message has one form.
        kwargs = dict(dest=f.name, type=str, default=argparse.SUPPRESS,
                      help=f.metadata.get("help", "") + f" ({describe_field(f.name)}; default: {f.default})")
        if "choices" in f.metadata:
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        elif tp is bool:
            kwargs["metavar"] = "{true,false}"
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        p.add_argument(*names, **kwargs)
    return p


def _config(values: dict) -> TrainConfig:
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None


def parse_train_args(argv) -> tuple[TrainConfig, bool, bool]:
    """(config, resume, overwrite) from the command line; UserError for bad input, before anything runs."""
    args = vars(train_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", False)
    overwrite = args.pop("overwrite", False)
    args.pop("debug", None)
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    file_values = load_config_file(config_file) if config_file else {}
    values = {}
    if resume:
        # A resumed run keeps its saved configuration; a config file and flags may still override it.
        explicit_out = args.get("out", file_values.get("out"))
        run_dir = resume if isinstance(resume, str) else explicit_out
        if not run_dir:
            raise UserError("resume: --resume needs a RUN_DIR (or --out)")
        if isinstance(resume, str) and explicit_out is not None and \
                os.path.abspath(str(explicit_out)) != os.path.abspath(run_dir):
            raise UserError(f"resume: --resume {run_dir} continues that run in place; --out {explicit_out} "
                            "names another directory (drop --out)")
        saved = _saved_config(run_dir)
        new_algo = args.get("algo", file_values.get("algo"))
        if new_algo is not None and new_algo != saved.get("algo"):
            raise UserError(f"resume: {run_dir} is a {saved.get('algo')} run; --algo {new_algo} would switch "
                            "its algorithm mid-way (start a new run with another --out instead)")
        values.update(saved)
        values["out"] = run_dir
    values.update(file_values)
    values.update(args)
    if resume:
        values["out"] = run_dir
    return _config(values), bool(resume), overwrite


def _saved_config(run_dir: str) -> dict:
    """The config.json of the run to resume (UserError when there is no such run)."""
    if not os.path.exists(run_dir):
        raise UserError(f"resume: {run_dir} does not exist (nothing to resume; start a run with --out "
                        f"{run_dir})")
    if not os.path.isdir(run_dir):
        raise UserError(f"resume: {run_dir} is not a directory")
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"resume: {run_dir} holds no run (no config.json)")
    try:
        return load_config_file(path)
    except UserError as error:
        raise UserError(f"resume: the run's config.json is damaged: {error}") from None


def config_from_args(argv) -> tuple[TrainConfig, bool]:
    """(config, resume) from the command line (UserError, a ValueError, for bad input)."""
    cfg, resume, _ = parse_train_args(argv)
    return cfg, resume


def report_error(prog: str, error: BaseException) -> int:
    """The one line of a user error (no traceback); returns the exit code 2."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def train_main(argv=None) -> int:
    from sppo_fast.trainer.signals import RunInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cfg, resume, overwrite = parse_train_args(argv)
        from sppo_fast.trainer.loop import train

        summary = train(cfg, resume=resume, overwrite=overwrite)
    except UserError as error:
        if debug:
            raise
        return report_error(PROG, error)
    except RunInterrupted as stop:
        print(f"{PROG}: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        print(f"{PROG}: interrupted at once; the work since the last checkpoint is lost (--resume RUN_DIR "
              "continues from it)", file=sys.stderr, flush=True)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("algo", "eval_accuracy_before", "eval_accuracy_after",
                                                  "wall_seconds", "steps", "run_dir")}, indent=2))
    return 0


def plot_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sppo-fast plot",
                                description="Plot held-out accuracy and training reward of runs, overlaid, "
                                            "against step and wall-clock (accuracy.png, reward.png).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the first RUN_DIR when "
                                               "one run is given, else ./plots)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from sppo_fast.trainer.plots import plot_runs

    out = args.out or (args.runs[0] if len(args.runs) == 1 else "plots")
    try:
        for path in plot_runs(args.runs, out):
            print(path)
    except ValueError as error:
        raise SystemExit(f"sppo-fast plot: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
