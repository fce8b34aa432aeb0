"""CPU benchmark of the fused ops against eager PyTorch, torch.compile, verl, TRL, Liger-Kernel, Cut
Cross-Entropy and PyTorch 2.13's chunked F.linear_cross_entropy, each row beside the machine's floor.
The logic lives in sppo_fast/bench/ops.py (also `sppo-fast bench`); see its docstring for what is
measured and how, and sppo_fast/bench/floors.py for the floors.

    python bench/bench_ops.py            # the full grid; results to bench/results/<cpu>-<N>core.*
    python bench/bench_ops.py --quick    # small sizes, checks the script
"""

import sys

from sppo_fast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
