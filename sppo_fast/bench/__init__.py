"""The benchmarks (`sppo-fast bench`, `python bench/*.py`), apart from the library: nothing in the core
imports this package. Layers, each importing only those below it:

  cli        `sppo-fast bench [--long-cot | --vocab-parallel]`: hands the arguments to one benchmark
  vocab_parallel  the loss stage over a vocabulary-parallel lm_head, per rank (gloo), against the
             unsharded call, torch's loss_parallel() and Megatron-core's vocab_parallel_cross_entropy
  long_cot   one whole RL update step on a long response, per `--loss_impl` of the trainer
  ops        the fused ops against what users run (tables: ops_report), with their floors (floors)
  floors     the machine's floors: streaming bandwidth, the native exp rate, three torch.mm
  harness    child-process runner, resident-set measures, the machine's description and load
"""
