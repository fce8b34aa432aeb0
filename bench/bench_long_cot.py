"""One whole RL update step (policy forward with activation checkpointing, loss, backward, AdamW) on
long responses at vocabulary 151936, for each --loss_impl of the trainer (torch_lce included): peak
memory, the loss stage's share of it, and time. The logic lives in sppo_fast/bench/long_cot.py (also
`sppo-fast bench --long-cot`); see its docstring for what is measured and how.

    python bench/bench_long_cot.py          # 1k..32k tokens; results to bench/results/long-cot-<cpu>-<N>core.*
    python bench/bench_long_cot.py --quick  # tiny sizes, checks the script
"""

import sys

from sppo_fast.bench.long_cot import main

if __name__ == "__main__":
    sys.exit(main())
