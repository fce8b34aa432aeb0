"""`sppo-fast bench` (registered in sppo_fast/cli.py): the ops benchmark (sppo_fast.bench.ops), with
`--long-cot` the whole-update-step benchmark (sppo_fast.bench.long_cot), or with `--vocab-parallel` the
scale-out benchmark of the vocabulary-parallel loss (sppo_fast.bench.vocab_parallel), or with `--interleaved`
implementations side by side round by round (sppo_fast.bench.interleaved), each with its own options."""

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long-cot" in argv:  # the whole-update-step benchmark has its own options
        from sppo_fast.bench.long_cot import main as long_cot_main

        return long_cot_main([a for a in argv if a != "--long-cot"])
    if "--vocab-parallel" in argv:  # so has the scale-out benchmark
        from sppo_fast.bench.vocab_parallel import main as vocab_parallel_main

        return vocab_parallel_main([a for a in argv if a != "--vocab-parallel"])
    if "--interleaved" in argv:  # and the interleaved comparison
        from sppo_fast.bench.interleaved import main as interleaved_main

        return interleaved_main([a for a in argv if a != "--interleaved"])
    from sppo_fast.bench.ops import main as ops_main

    return ops_main(argv)


if __name__ == "__main__":
    sys.exit(main())
