"""Implementations side by side in one process, interleaved round by round, so that a machine whose speed
drifts slows them all alike. The logic lives in sppo_fast/bench/interleaved.py; see its docstring.

    python bench/bench_interleaved.py --shape bf16:151936 --impls sppo_fast torch_lce:256 torch_lce:1024 cce
"""

import sys

from sppo_fast.bench.interleaved import main

if __name__ == "__main__":
    sys.exit(main())
