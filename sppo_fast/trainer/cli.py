"""`sppo-fast train` and `sppo-fast plot`. Every field of `TrainConfig` is a `--field` flag whose help is
the field's documentation; `--config FILE.yaml|json` sets many at once (flags win)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from sppo_fast.trainer.config import TrainConfig, field_types, load_config_file, parse_bool


def _arg_type(tp):
    if tp is bool:
        return parse_bool
    return tp


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sppo-fast train",
        description="Train a small policy with SPPO (one sample per prompt, a scalar prompt critic) or a "
                    "baseline (GRPO, DAPO, Dr. GRPO, RLOO, GSPO, SSPO, PPO) on a task with verifiable "
                    "rewards. "
                    "With no arguments: SPPO on arithmetic with a tiny Llama-style model, warm-started by "
                    "cached supervised fine-tuning. Under `torchrun --nproc_per_node K` the same command "
                    "shards the rollouts over K processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of field: value (flags override it)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) from its last checkpoint; its config.json "
                        "gives the defaults")
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        tp = types[f.name]
        kwargs = dict(dest=f.name, type=_arg_type(tp), default=argparse.SUPPRESS,
                      help=f.metadata.get("help", "") + f" (default: {f.default})")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["metavar"] = "{true,false}"
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        p.add_argument(*names, **kwargs)
    return p


def config_from_args(argv) -> tuple[TrainConfig, bool]:
    args = vars(train_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", False)
    file_values = load_config_file(config_file) if config_file else {}
    values = {}
    if resume:
        # A resumed run keeps its saved configuration; a config file and flags may still override it.
        run_dir = resume if isinstance(resume, str) else args.get("out", file_values.get("out"))
        if not run_dir:
            raise SystemExit("sppo-fast train: --resume needs a RUN_DIR or --out")
        saved = os.path.join(run_dir, "config.json")
        if os.path.exists(saved):
            values.update(load_config_file(saved))
        values["out"] = run_dir
    values.update(file_values)
    values.update(args)
    try:
        return TrainConfig.from_dict(values), bool(resume)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"sppo-fast train: {error}") from None


def train_main(argv=None) -> int:
    cfg, resume = config_from_args(sys.argv[1:] if argv is None else argv)
    from sppo_fast.trainer.loop import train

    summary = train(cfg, resume=resume)
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
