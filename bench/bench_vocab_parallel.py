"""The vocabulary-parallel (tensor-parallel lm_head) benchmark, per rank, on the CPU with gloo: sppo_fast's
fused policy loss unsharded and with its weight split over P ranks, against loss_parallel over DTensor
logits and Megatron-core's vocab_parallel_cross_entropy; step time, peak memory per rank and the bytes
each rank hands to collectives per token. The logic lives in sppo_fast/bench/vocab_parallel.py (also
`sppo-fast bench --vocab-parallel`); see its docstring for what is measured and how.

    python bench/bench_vocab_parallel.py          # P = 2, 4; V = 151936: bench/results/vocab-parallel-<machine>.*
    python bench/bench_vocab_parallel.py --quick  # small N and V, P = 2: checks the script in under a minute
"""

import sys

from sppo_fast.bench.vocab_parallel import main

if __name__ == "__main__":
    sys.exit(main())
