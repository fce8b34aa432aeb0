"""CPU benchmark of the fused ops against eager PyTorch, torch.compile, Liger-Kernel and Cut
Cross-Entropy. The logic lives in sppo_fast/bench_cli.py (also `sppo-fast bench`); see its docstring
for what is measured and how.

    python bench/bench_ops.py            # the full grid; results to bench/results/cpu-<N>core.*
    python bench/bench_ops.py --quick    # small sizes, checks the script
"""

import sys

from sppo_fast.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
