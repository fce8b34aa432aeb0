"""`sppo-fast bench` (registered in sppo_fast/cli.py): the ops benchmark (sppo_fast.bench.ops), or with
`--long-cot` the whole-update-step benchmark (sppo_fast.bench.long_cot), each with its own options."""

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long-cot" in argv:  # the whole-update-step benchmark has its own options
        from sppo_fast.bench.long_cot import main as long_cot_main

        return long_cot_main([a for a in argv if a != "--long-cot"])
    from sppo_fast.bench.ops import main as ops_main

    return ops_main(argv)


if __name__ == "__main__":
    sys.exit(main())
