"""The `sppo-fast` command. Each subcommand lives in its own module and parses its own arguments,
so that importing the CLI stays cheap and `--help` of a subcommand explains that subcommand."""

import importlib
import sys

# name -> (module:function taking argv, one-line description)
SUBCOMMANDS = {
    "train": ("sppo_fast.trainer.cli:train_main", "train a policy with SPPO or a baseline (the main job)"),
    "plot": ("sppo_fast.trainer.cli:plot_main", "plot accuracy and reward of one or more run directories"),
    "compare": ("sppo_fast.trainer.compare:main", "train algorithms x seeds side by side; table and plot"),
    "trl-job": ("sppo_fast.trainer.trl_job:main", "the same job through TRL: GRPOTrainer vs SppoFastGRPOTrainer "
                "vs SPPOTrainer"),
    "demo": ("sppo_fast.demo:main", "run the fused policy loss on random data and compare with eager"),
    "bench": ("sppo_fast.bench.cli:main", "benchmark the fused ops against eager PyTorch, torch.compile and the floor"),
    "info": ("sppo_fast.cli:info_main", "print which kernel backend serves each device, and why"),
}


def info_main(argv):
    from sppo_fast import backend_info

    for device, line in backend_info().items():
        print(f"{device}: {line}")
    return 0


def usage():
    lines = ["usage: sppo-fast COMMAND [ARGS...]", "",
             "Fused kernels and a small trainer for RL of reasoning LLMs (SPPO, GRPO, DAPO, GSPO, SSPO).",
             "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `sppo-fast COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sppo-fast: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
