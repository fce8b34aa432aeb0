"""`sppo-fast bench` (also `python bench/bench_ops.py`): the CPU benchmark of the fused ops against
what users actually run, and against the machine's floors.

Times forward and forward+backward and measures peak memory of
  token_logprobs      log-probs + entropy from (B, T, V) logits, backward of a fixed random mix of both;
  fused_policy_loss   the policy loss straight from logits, presets dapo (default), gspo and sspo;
  fused_linear        the policy loss from hidden states x lm_head (dapo, with entropy), never holding
                      the logits, at fp32 V=32000 and bf16 V=151936 (--linear-shapes);
for each implementation, side by side in one run:
  sppo_fast           the op on the native CPU backend (csrc/)
  sppo_fast_inplace   the same with inplace_backward=True (the gradient overwrites the logits)
  sppo_fast_two_pass  fused_policy_loss with one_pass=False: the two-pass form, which sppo_fast (one_pass
                      chosen by the plan: one pass for bf16/fp16 logits) is measured against
  sppo_fast_one_pass  one_pass=True: the one-pass form where the plan keeps two (fp32); not in the default
                      cases, for bench_interleaved.py
  sppo_fast_chunk128  fused_linear with chunk_size=128: the rows per chunk of torch_lce_tuned's smallest
                      candidate, so that its memory is compared with torch's at the same chunk (linear only)
  torch_eager         the idiomatic loss: fp32 log_softmax + gather, entropy -(p * logp).sum(-1), then the
                      preset's loss stage (sppo_fast.policy_loss, plain PyTorch on (B, T): the DAPO loss)
  torch_compile       torch.compile of torch_eager
  verl_eager/compile  verl 0.9.1's logprobs_from_logits + entropy_from_logits + compute_policy_loss_vanilla
                      (token-mean, its default dual clip 3.0), eager and compiled (dapo only)
  trl_eager/compile   TRL 1.16's selective_log_softmax + entropy_from_logits (under no_grad, as its
                      GRPOTrainer), then the DAPO loss stage (dapo only)
  liger               Liger-Kernel's LigerFusedLinearGRPOLoss(compiled=True), loss_type="dapo" (linear only)
  cce                 Cut Cross-Entropy's linear_cross_entropy(impl="torch_compile") (linear only; the mean
                      cross-entropy, i.e. the log-probs without entropy or policy loss: less work than ours)
  trl_chunked         TRL 1.16's chunked fused LM head (trl/kernels/chunked_logprob.py) with entropy, then
                      the DAPO loss stage (linear only)
  torch_lce           PyTorch 2.13's chunked F.linear_cross_entropy(reduction="none") with its default
                      LinearCrossEntropyOptions() (per-token log-probs: sppo_fast.trainer.loss_impls), then
                      the DAPO loss stage (linear only; it gives no entropy: less work than ours)
  torch_lce_tuned     the same with the options that suit the shape best: the child first times one
                      forward+backward of each candidate (rows per chunk from 128 to all of them; the
                      "compact" policy at fp32, "accurate" at bf16, the only one whose matmuls stay in fp32
                      on CPU, the others emulating bf16 ~20-50x slower, torch's docstring says), keeps the
                      fastest and records the sweep (linear only; no entropy)
  oracle              sppo_fast.reference, the fp64-grade oracle of the tests (several passes on purpose):
                      only with --impls oracle, and labelled as such, never a baseline
Every implementation but torch_lce and cce also returns the mean entropy (the metric a trainer logs),
so compile cannot drop the entropy as dead code.

How it measures. Every (case, implementation) runs in its own child process, so that compilation caches,
allocator state and peak RSS of one cannot leak into another. In the child: inputs are built, the first
call (compilation included) is timed as first_call_s, `warmup` more calls run, then the median wall time
of `reps` calls (fewer, at least one, recorded in the row, when the first call says they would take
longer than --max-case-s: torch_lce's defaults at bf16 V=151936 take minutes a call) of the forward
(under no_grad) and of forward+backward (torch.autograd.grad of the loss with respect to the logits, or
hidden and weight for the linear case). The in-place variant restores its logits from a pristine copy
before each call, outside the timed region. Peak memory: there is no allocator counter on CPU, so the
child measures the resident set: glibc is first told to serve every allocation of 64 KiB or more with
its own mmap and to return freed memory at once (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so the
resident set follows the live tensors; then the kernel's high-water mark is reset
(/proc/self/clear_refs), one call runs, and peak_mib = VmHWM - VmRSS before the call: memory above the
inputs, the results of the call included (the gradient of fwd_bwd). Cases whose eager run would need
more than --max-gib are skipped.
Floors (sppo_fast/bench/floors.py), measured in the same run, before the cases and again after them
(the better of the two is the floor): the machine's streaming bandwidth and native exp rate bound the
logits path, three torch.mm of the op's shapes bound the linear path; every row gets "% of floor".
Load (sppo_fast/bench/harness.py): before each row the run waits up to --settle seconds for the
1-minute load average to fall to --max-load (1.5 on 2 cores); a row that starts above it, or during
which other processes used more than half a core, is flagged in the tables (--refuse-loaded: not run).
"""

import argparse
import json
import os
import sys
import time

import torch

from sppo_fast.bench import floors as floors_mod
from sppo_fast.bench import harness
from sppo_fast.bench.harness import add_load_arguments, environment, load_policy, median_ms, peak_extra_mib
from sppo_fast.bench.ops_report import ORACLE, key_of, markdown_table, speedups, write_reports

OPS = ("token_logprobs", "fused_policy_loss", "fused_linear")
PRESETS = ("dapo", "gspo", "sspo")
IMPLS = {"token_logprobs": ("sppo_fast", "sppo_fast_inplace", "torch_compile", "torch_eager"),
         "fused_policy_loss": ("sppo_fast", "sppo_fast_inplace", "sppo_fast_two_pass", "torch_compile", "torch_eager",
                               "verl_compile", "verl_eager", "trl_compile", "trl_eager"),
         "fused_linear": ("sppo_fast", "sppo_fast_chunk128", "torch_compile", "liger", "cce", "trl_chunked",
                          "torch_lce", "torch_lce_tuned")}
PEER_IMPLS = ("verl_compile", "verl_eager", "trl_compile", "trl_eager")  # their loss is the dapo one
TOKENS = (2048,)  # the size of the targets
SHAPES = ("fp32:32000", "bf16:151936")  # the two target shapes: dtype:V
LINEAR_SHAPES = ("fp32:32000", "bf16:151936")  # the linear path's, issue 18
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 512  # tokens per sequence: B = tokens / SEQ_LEN
SEGMENT_LEN = 32  # SSPO: tokens per segment of the synthetic segment ids
HIDDEN = 512  # the linear case's hidden size
EAGER_LOGITS_COPIES = 5  # an eager fwd+bwd holds about this many logits-sized fp32 tensors
LCE_CHUNKS = (128, 256, 512, 1024, 2048, 4096)  # torch_lce_tuned's candidate rows per chunk (<= the rows)
SMALL_CHUNK = LCE_CHUNKS[0]  # sppo_fast_chunk128's rows per chunk
LCE_POLICY = {"fp32": "compact", "bf16": "accurate"}  # torch_lce_tuned's precision policy per dtype


def _shape(text):
    dtype, _, vocab = text.partition(":")
    if dtype not in DTYPES or not vocab.isdigit():
        raise argparse.ArgumentTypeError(f"expected dtype:V with dtype in {sorted(DTYPES)}, got {text!r}")
    return dtype, int(vocab)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sppo-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=["dapo"])
    p.add_argument("--impls", nargs="+", default=None,
                   help="subset of the implementations (default all but the oracle)")
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--shapes", nargs="+", default=[_shape(x) for x in SHAPES], type=_shape,
                   help="dtype:V pairs of the logits, e.g. fp32:32000 bf16:151936")
    p.add_argument("--linear-tokens", nargs="+", type=int, default=[2048])
    p.add_argument("--linear-shapes", nargs="+", default=[_shape(x) for x in LINEAR_SHAPES], type=_shape,
                   help="dtype:V pairs of the linear case's hidden states and lm_head (H = 512)")
    p.add_argument("--linear-vocab", nargs="+", type=int, default=None,
                   help="fp32 vocabularies of the linear case (instead of --linear-shapes)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=18.0, help="skip cases whose eager run would need more")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--max-case-s", type=float, default=600.0,
                   help="an implementation whose first call says its calls would take longer makes fewer "
                        "repetitions (at least one; recorded as reps in its row)")
    add_load_arguments(p)
    p.add_argument("--no-floors", action="store_true", help="do not measure the machine's floors")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script in about a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<cpu>-<isa>-<N>core.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing --out file that this run does not measure again")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md and .png of an existing --out file without measuring")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.linear_vocab:
        args.linear_shapes = [("fp32", v) for v in args.linear_vocab]
    if args.quick:
        args.tokens, args.shapes, args.linear_tokens = [256], [("fp32", 4096)], [256]
        args.linear_shapes = [("fp32", 4096)]
        args.reps, args.warmup, args.settle = 3, 1, min(args.settle, 5.0)
    return args

# ----------------------------------------------------------------------------------------------------
# Inputs and the functions under test (run in the child)


def make_inputs(tokens, vocab, dtype, *, hidden=None, seed=0):
    """One RL micro-batch of `tokens` positions: logits (B, T, V) (or hidden (B, T, H) and weight (V, H)),
    targets, old_logp near the current policy (ratios near 1, as in training), advantages (B,), a mask
    with padding, SSPO segment ids, and the random coefficients of the token_logprobs loss."""
    seq = min(SEQ_LEN, tokens)
    batch = max(1, tokens // seq)
    gen = torch.Generator().manual_seed(seed)
    inp = {}
    if hidden is None:
        inp["logits"] = torch.empty(batch, seq, vocab, dtype=dtype)
        for b in range(batch):  # a sequence at a time: no fp32 copy of 16k x 152k bf16 logits
            inp["logits"][b] = torch.randn(seq, vocab, generator=gen) * 2.0
    else:
        inp["hidden"] = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
        inp["weight"] = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    inp["targets"] = torch.randint(0, vocab, (batch, seq), generator=gen)
    inp["advantages"] = torch.randn(batch, generator=gen)
    mask = torch.ones(batch, seq)
    mask[:, seq - seq // 8:] = 0  # some padding, as in any RL batch
    inp["mask"] = mask
    positions = torch.arange(seq).expand(batch, seq)
    inp["segment_ids"] = torch.where(mask > 0, positions // SEGMENT_LEN, -1)
    inp["g_logp"] = torch.randn(batch, seq, generator=gen)
    inp["g_ent"] = torch.randn(batch, seq, generator=gen)
    inp["old_logp"] = _current_logp(inp) + 0.05 * torch.randn(batch, seq, generator=gen)
    return inp


def _current_logp(inp):
    import sppo_fast as sf

    with torch.no_grad():
        if "logits" in inp:
            return sf.token_logprobs(inp["logits"], inp["targets"])
        return sf.linear_logprobs(inp["hidden"], inp["weight"], inp["targets"])


def _config(preset):
    import sppo_fast as sf

    return sf.PolicyLossConfig.preset(preset)


def _loss_kwargs(inp, preset):
    return {"segment_ids": inp["segment_ids"]} if preset == "sspo" else {}


def idiomatic_logprobs(logits, targets):
    """What a trainer writes without a fused kernel: fp32 log_softmax, gather, entropy -(p log p)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trl_logprobs(logits, targets):
    """TRL 1.16's GRPOTrainer: selective_log_softmax with grad, entropy_from_logits under no_grad (its
    CPU paths: the Triton kernel serves only CUDA/XPU tensors)."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logp = selective_log_softmax(logits, targets)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logp, entropy


def verl_actor_config(config):
    """The verl 0.9.1 ActorConfig its vanilla policy loss reads (clip bounds of the preset; verl's default
    dual clip 3.0 stays: that is what verl runs)."""
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=True, clip_ratio=config.clip_low,
                       clip_ratio_low=config.clip_low, clip_ratio_high=config.clip_high, global_batch_info={})


def verl_policy_loss(logits, inp, actor_config):
    """verl 0.9.1's actor: logprobs_from_logits + entropy_from_logits (CPU: no flash-attn
    cross-entropy, so its log_softmax paths) + compute_policy_loss_vanilla, token-mean."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    logp = logprobs_from_logits(logits, inp["targets"])
    entropy = entropy_from_logits(logits)
    adv = inp["advantages"].unsqueeze(-1).expand_as(logp)
    loss, _ = compute_policy_loss_vanilla(inp["old_logp"], logp, adv, inp["mask"], loss_agg_mode="token-mean",
                                          config=actor_config)
    return loss, _masked_mean(entropy.detach(), inp["mask"])


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _policy_loss(logp, entropy, inp, config, preset):
    """The (B, T) loss stage every from-logits implementation shares: sppo_fast.policy_loss (plain
    PyTorch) with the preset; returns (loss, mean entropy), the entropy as the metric a trainer logs
    (None when `entropy` is)."""
    import sppo_fast as sf

    out = sf.policy_loss(logp, inp["old_logp"], inp["advantages"], inp["mask"], _config(preset), entropy=entropy,
                         **_loss_kwargs(inp, preset))
    return out.loss, out.metrics.get("entropy")  # None without an entropy (torch_lce)


def _compiled(fn):
    """torch.compile of fn(x, inp) with the tensors of inp as arguments (so that they are graph
    inputs, not constants), keeping only the loss: the other outputs stay computed, as a trainer
    logs them, and cannot be dropped as dead code."""
    compiled = torch.compile(lambda x, **tensors: fn(x, tensors))
    big = ("logits", "hidden", "weight")  # already x
    return lambda x, inp: compiled(x, **{k: v for k, v in inp.items() if k not in big})[0]


def from_logits_fn(op, impl, preset):
    """fn(logits, inp) -> (loss, logged extra) for the ops on (B, T, V) logits."""
    import sppo_fast as sf
    from sppo_fast import reference

    if op == "token_logprobs":
        def loss_of(logp, entropy, inp):
            return (logp * inp["g_logp"]).sum() + (entropy * inp["g_ent"]).sum(), entropy.detach().mean()

        def native(x, inp, **kw):
            return loss_of(*sf.token_logprobs(x, inp["targets"], return_entropy=True, **kw), inp)

        return {"sppo_fast": native,
                "sppo_fast_inplace": lambda x, inp: native(x, inp, inplace_backward=True),
                "torch": lambda x, inp: loss_of(*idiomatic_logprobs(x, inp["targets"]), inp),
                "oracle": lambda x, inp: loss_of(*reference.token_logprobs(x, inp["targets"], return_entropy=True),
                                                 inp)}[impl]
    config = _config(preset)

    def native(x, inp, **kw):
        out = sf.fused_policy_loss(x, inp["targets"], inp["old_logp"], inp["advantages"], inp["mask"], config,
                                   **_loss_kwargs(inp, preset), **kw)
        return out.loss, out.metrics["entropy"]

    if impl == "verl":
        actor_config = verl_actor_config(config)
        return lambda x, inp: verl_policy_loss(x, inp, actor_config)
    return {"sppo_fast": native,
            "sppo_fast_inplace": lambda x, inp: native(x, inp, inplace_backward=True),
            "sppo_fast_two_pass": lambda x, inp: native(x, inp, one_pass=False),
            "sppo_fast_one_pass": lambda x, inp: native(x, inp, one_pass=True),
            "torch": lambda x, inp: _policy_loss(*idiomatic_logprobs(x, inp["targets"]), inp, config, preset),
            "trl": lambda x, inp: _policy_loss(*trl_logprobs(x, inp["targets"]), inp, config, preset),
            "oracle": lambda x, inp: _policy_loss(*reference.token_logprobs(x, inp["targets"], return_entropy=True),
                                                  inp, config, preset)}[impl]


def linear_fn(impl, lce_options=None):
    """fn((hidden, weight), inp) -> (loss, logged extra) for the linear case (dapo); `lce_options`: the
    LinearCrossEntropyOptions of torch_lce (default: torch's defaults)."""
    import sppo_fast as sf

    config = _config("dapo")
    if impl in ("torch_lce", "torch_lce_tuned"):
        from sppo_fast.trainer.loss_impls import torch_lce_logprobs

        options = torch.nn.LinearCrossEntropyOptions() if lce_options is None else lce_options

        def lce(x, inp):
            logp = torch_lce_logprobs(x[0], x[1], inp["targets"], options=options)
            return _policy_loss(logp, None, inp, config, "dapo")
        return lce
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=True, use_ref_model=False, loss_type="dapo",
                                         epsilon_low=config.clip_low, epsilon_high=config.clip_high)
        return lambda x, inp: liger(x[0], x[1], inp["targets"], inp["mask"], inp["advantages"],
                                    old_per_token_logps=inp["old_logp"])
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(x, inp):
            targets = torch.where(inp["mask"] > 0, inp["targets"], -100)
            return linear_cross_entropy(x[0], x[1], targets, impl="torch_compile"), None
        return cce
    if impl == "trl_chunked":
        return trl_chunked_loss
    if impl in ("sppo_fast", "sppo_fast_chunk128"):
        chunk_size = SMALL_CHUNK if impl == "sppo_fast_chunk128" else None

        def native(x, inp):
            out = sf.fused_linear_policy_loss(x[0], x[1], inp["targets"], inp["old_logp"], inp["advantages"],
                                              inp["mask"], config, chunk_size=chunk_size)
            return out.loss, out.metrics["entropy"]
        return native
    if impl == "torch":
        return lambda x, inp: _policy_loss(*idiomatic_logprobs(x[0] @ x[1].T, inp["targets"]), inp, config, "dapo")
    raise ValueError(f"no implementation {impl!r} of fused_linear")


def trl_chunked_loss(x, inp):
    """TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py, what GRPOTrainer runs with
    fused_lm_head): log-probs and entropy of hidden @ weight.T in tiles of 4096 tokens x 32768 vocab
    entries, every position scored as on a device without Triton; then the DAPO loss stage."""
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight = x
    B, T, H = hidden.shape
    targets = inp["targets"].reshape(-1)
    logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden.reshape(-1, H), weight, None, targets, 1.0, 32768, None,
                                                     1.0, ("entropy",))
    return _policy_loss(logp.view(B, T), entropy.detach().view(B, T), inp, _config("dapo"), "dapo")


def build_fn(op, impl, preset, lce_options=None):
    """fn(x, inp) -> scalar loss, where x is the logits (or (hidden, weight) for fused_linear); the
    `_compile` suffix is torch.compile of the eager implementation of that name."""
    base, compiled = (impl[:-len("_compile")], True) if impl.endswith("_compile") else (impl.removesuffix("_eager"),
                                                                                           False)
    fn = linear_fn(base, lce_options) if op == "fused_linear" else from_logits_fn(op, base, preset)
    if compiled:
        return _compiled(fn)
    return lambda x, inp: fn(x, inp)[0]



def lce_options_of(spec):
    """LinearCrossEntropyOptions from a dict of its fields (JSON: acc_dtype by name)."""
    if spec is None:
        return None
    spec = dict(spec)
    if isinstance(spec.get("acc_dtype"), str):
        spec["acc_dtype"] = getattr(torch, spec["acc_dtype"].removeprefix("torch."))
    return torch.nn.LinearCrossEntropyOptions(**spec)


def lce_resolved(options, x):
    """What torch resolves `options` to on these inputs (rows per chunk, policy, accumulation dtype), for
    the record; None if this torch cannot say."""
    hidden, weight = x
    try:
        got = options._adjust(num_batches=hidden.numel() // hidden.shape[-1], in_features=hidden.shape[-1],
                              num_classes=weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    except Exception:  # noqa: BLE001 - a private method of torch: only for the record
        return None
    return {"batch_chunk_size": got.batch_chunk_size, "acc_policy": got.acc_policy,
            "acc_dtype": str(got.acc_dtype).removeprefix("torch."), "chunking_method": got.chunking_method}


def lce_candidates(tokens, dtype):
    """torch_lce_tuned's candidate options on `tokens` rows of dtype (see the module docstring)."""
    return [{"batch_chunk_size": rows, "acc_policy": LCE_POLICY[dtype]}
            for rows in sorted({min(c, tokens) for c in LCE_CHUNKS})]


def lce_sweep(x, wrt, inp, dtype):
    """(fastest options, the sweep): one untimed and one timed forward+backward of each candidate."""
    tokens = x[0].numel() // x[0].shape[-1]
    sweep = []
    for spec in lce_candidates(tokens, dtype):
        fn = build_fn("fused_linear", "torch_lce", "dapo", lce_options_of(spec))

        def call(fn=fn):
            return torch.autograd.grad(fn(x, inp), wrt)
        call()
        t0 = time.perf_counter()
        call()
        sweep.append(dict(spec, fwd_bwd_ms=round((time.perf_counter() - t0) * 1e3, 1)))
    best = min(sweep, key=lambda r: r["fwd_bwd_ms"])
    return {k: v for k, v in best.items() if k != "fwd_bwd_ms"}, sweep


# ----------------------------------------------------------------------------------------------------
# Measurement (in the child; the measures are sppo_fast.bench.harness's)


def run_child(case):
    """Measures one (case, implementation); returns the result fields."""
    op, impl, preset = case["op"], case["impl"], case.get("preset")
    dtype = DTYPES[case["dtype"]]
    hidden = HIDDEN if op == "fused_linear" else None
    inp = make_inputs(case["tokens"], case["vocab"], dtype, hidden=hidden)
    result = {}
    if op == "fused_linear":
        x = (inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True))
        wrt = list(x)
    else:
        x = inp["logits"].requires_grad_(True)
        wrt = [x]
    options = None
    if impl == "torch_lce_tuned":  # the options that suit the shape best, timed here (so its first_call_s
        # is a warm one)
        spec, result["lce_sweep"] = lce_sweep(x, wrt, inp, case["dtype"])
        options = lce_options_of(spec)
    if impl.startswith("torch_lce"):
        result["lce_options"] = lce_resolved(options or torch.nn.LinearCrossEntropyOptions(), x)
    fn = build_fn(op, impl, preset, options)
    restore = None
    if impl == "sppo_fast_inplace":  # the backward overwrites the logits: give each call fresh ones
        pristine = x.detach().clone()

        def restore():
            with torch.no_grad():
                x.copy_(pristine)

    def forward():
        with torch.no_grad():
            return fn(x, inp)

    def forward_backward():
        loss = fn(x, inp)
        return torch.autograd.grad(loss, wrt)

    t0 = time.perf_counter()
    forward_backward()
    forward()
    result["first_call_s"] = round(time.perf_counter() - t0, 3)
    reps, warmup = case["reps"], case["warmup"]
    budget = case.get("max_case_s")
    if budget and result["first_call_s"] * (warmup + 2 * reps + 2) > budget:
        # A slow implementation (torch_lce's default options at bf16 V=151936 take minutes a call): time
        # one warm call, and make as few calls as the budget allows (at least one of each), recorded.
        if restore:
            restore()
        t0 = time.perf_counter()
        forward_backward()
        per_call = time.perf_counter() - t0
        reps = max(1, min(reps, int((budget / per_call - 2) / 2)))
        warmup = 0  # the call just timed was the warm-up
        result["reps"], result["warmup"], result["reps_cut_by_budget_s"] = reps, warmup, budget
    for _ in range(warmup):
        if restore:
            restore()
        forward_backward()
    result["fwd_ms"], result["fwd_cpu_ms"] = median_ms(forward, reps, restore)
    result["fwd_bwd_ms"], result["fwd_bwd_cpu_ms"] = median_ms(forward_backward, reps, restore)
    harness._faithful_rss()
    if restore:
        restore()
    result["fwd_peak_mib"], _ = peak_extra_mib(forward)
    if restore:
        restore()
    result["fwd_bwd_peak_mib"], result["pool_held_mib"] = peak_extra_mib(forward_backward)
    return result


def child_main(case_json):
    return harness.report_result(run_child, case_json)


# ----------------------------------------------------------------------------------------------------
# The run (in the parent)


def logits_mib(tokens, vocab, dtype):
    return tokens * vocab * torch.tensor([], dtype=DTYPES[dtype]).element_size() / 2**20


def cases(args):
    def impls(op, preset):
        known = IMPLS[op] + ((ORACLE,) if op != "fused_linear" else ())
        chosen = [i for i in known if (i in args.impls if args.impls else i != ORACLE)]
        return [i for i in chosen if preset == "dapo" or i not in PEER_IMPLS]

    for op in args.ops:
        if op == "fused_linear":
            for dtype, vocab in args.linear_shapes:
                for tokens in args.linear_tokens:
                    for impl in impls(op, "dapo"):
                        yield {"op": op, "impl": impl, "preset": "dapo", "tokens": tokens, "vocab": vocab,
                               "dtype": dtype, "hidden": HIDDEN}
            continue
        for dtype, vocab in args.shapes:
            for tokens in args.tokens:
                for preset in (args.presets if op == "fused_policy_loss" else [None]):
                    for impl in impls(op, preset):
                        yield {"op": op, "impl": impl, "preset": preset, "tokens": tokens, "vocab": vocab,
                               "dtype": dtype}


def too_big(case, args):
    """A reason to skip the case, or None."""
    if case["op"] == "fused_linear":
        return None
    logits_gib = logits_mib(case["tokens"], case["vocab"], case["dtype"]) / 1024
    if not case["impl"].startswith("sppo_fast"):  # fp32 temporaries the size of the logits
        need = logits_gib + case["tokens"] * case["vocab"] * 4 / 2**30 * EAGER_LOGITS_COPIES
    else:  # the logits and their gradient (in place: the logits and a pristine copy to restore)
        need = 2 * logits_gib
    if need > args.max_gib:
        return f"skipped: would need about {need:.0f} GiB (> --max-gib {args.max_gib:g})"
    return None


def run_case(case, args):
    row = dict(case, logits_mib=round(logits_mib(case["tokens"], case["vocab"], case["dtype"]), 1))
    skip = too_big(case, args)
    if skip:
        return dict(row, status=skip)
    payload = dict(case, reps=args.reps, warmup=args.warmup, max_case_s=args.max_case_s)
    return harness.run_in_child("sppo_fast.bench.ops", payload, row, args.timeout, load=load_policy(args))


def measure_floors(args, case_list, previous=None):
    """The machine's floors (sppo_fast/bench/floors.py), each in a child: the stream bandwidth and the exp
    rate of the logits dtypes, and the three matmuls of each linear shape. With `previous` (the floors
    measured before the cases), both are kept and the better of the two is the floor."""
    policy, module = load_policy(args), "sppo_fast.bench.floors"
    dtypes = sorted({c["dtype"] for c in case_list if c["op"] != "fused_linear"})
    machine = {"kind": "machine", "dtypes": dtypes}
    out = {"machine": harness.run_in_child(module, machine, {}, args.timeout, load=policy) if dtypes else {},
           "matmul": []}
    for shape in sorted({(c["tokens"], c["hidden"], c["vocab"], c["dtype"]) for c in case_list
                         if c["op"] == "fused_linear"}):
        row = dict(zip(("tokens", "hidden", "vocab", "dtype"), shape))
        payload = dict(row, kind="matmul", reps=args.reps)
        out["matmul"].append(harness.run_in_child(module, payload, row, args.timeout, load=policy))
    if previous is None:
        return out
    return best_floors(previous, out)


def best_floors(before, after):
    """The lower floor of two measurements (the higher bandwidth and trusted exp rate, the faster matmuls),
    with both measurements kept under "runs"."""
    best = {"runs": [before, after], "machine": dict(before.get("machine") or {}), "matmul": []}
    m_after = after.get("machine") or {}
    if m_after.get("status") == "ok":
        m = best["machine"]
        if m.get("status") != "ok":
            best["machine"] = dict(m_after)
        else:
            m["stream_gbps"] = max(m["stream_gbps"], m_after["stream_gbps"])
            m["exp"] = {d: _better_exp_rate(m["exp"].get(d), m_after["exp"].get(d))
                        for d in set(m["exp"]) | set(m_after["exp"])}
    shape = lambda r: (r["tokens"], r["hidden"], r["vocab"], r["dtype"])  # noqa: E731
    later = {shape(r): r for r in after.get("matmul", [])}
    for r in before.get("matmul", []):
        r2 = later.get(shape(r), {})
        ok = [x for x in (r, r2) if x.get("status") == "ok"]
        best["matmul"].append(min(ok, key=lambda x: x["mm3_ms"]) if ok else r)
    return best


def _better_exp_rate(a, b, trusted_error=0.1):
    """Of two exp-rate measurements (floors.rate_from_blocks), the higher rate among those whose fit error
    is small; if neither's is, the one with the smaller error (a rate from a bent line is no floor)."""
    found = [e for e in (a, b) if e]
    trusted = [e for e in found if e.get("exp_fit_error", 0.0) <= trusted_error]
    if trusted:
        return max(trusted, key=lambda e: e.get("exp_per_s", 0))
    return min(found, key=lambda e: e["exp_fit_error"]) if found else None


def attach_floors(rows, floors):
    """Each measured row with its floors and "% of floor" (floors.floors_of_row)."""
    matmul = {(r["tokens"], r["hidden"], r["vocab"], r["dtype"]): r for r in floors.get("matmul", [])}
    machine = floors.get("machine") if (floors.get("machine") or {}).get("status") == "ok" else {}
    return [floors_mod.floors_of_row(r, machine, matmul) for r in rows]


def default_out():
    return os.path.join(harness.results_dir(), harness.machine_slug() + ".json")


def agreement():
    """Before timing anything: the fused loss and its gradient on the native backend against eager on a
    small case, so that a broken kernel cannot produce good-looking numbers."""
    import sppo_fast as sf
    from sppo_fast import reference

    inp = make_inputs(512, 1000, torch.float32, seed=1)
    config = _config("dapo")
    got = {}
    for name, module in (("sppo_fast", sf), ("eager", reference)):
        x = inp["logits"].detach().clone().requires_grad_(True)
        out = module.fused_policy_loss(x, inp["targets"], inp["old_logp"], inp["advantages"], inp["mask"],
                                       config)
        (grad,) = torch.autograd.grad(out.loss, x)
        got[name] = (out.loss.detach().double(), grad.double())
    report = {"loss_abs_diff": (got["sppo_fast"][0] - got["eager"][0]).abs().item(),
              "grad_max_abs_diff": (got["sppo_fast"][1] - got["eager"][1]).abs().max().item(),
              "grad_max_abs": got["eager"][1].abs().max().item()}
    report["ok"] = (report["loss_abs_diff"] < 1e-4
                    and report["grad_max_abs_diff"] <= 1e-4 * report["grad_max_abs"])
    return report



def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.child is not None:
        return child_main(args.child)
    if args.report_only:
        with open(args.out or default_out()) as f:
            report = json.load(f)
        report["speedups"] = speedups(report["results"])
        write_reports(report, args.out or default_out(), not args.no_plot)
        return 0
    import sppo_fast as sf

    if not sf.backend_info()["cpu"].startswith("native"):
        print(f"warning: the native kernels do not serve CPU here ({sf.backend_info()['cpu']}); "
              "the 'sppo_fast' rows time whatever does", file=sys.stderr)
    report = {"environment": environment(), "settings": {k: v for k, v in vars(args).items() if k != "child"},
              "method": __doc__.split("How it measures.")[1].strip(), "agreement": agreement(), "results": []}
    print(json.dumps(report["environment"], indent=1), "\nagreement:", report["agreement"], flush=True)
    if not report["agreement"]["ok"]:
        print("the fused loss disagrees with eager: not timing a wrong kernel", file=sys.stderr)
        return 1
    case_list = list(cases(args))
    floors = None if args.no_floors else measure_floors(args, case_list)
    print("floors before the cases:", json.dumps(floors), flush=True)
    for case in case_list:
        row = run_case(case, args)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    if floors is not None:
        floors = measure_floors(args, case_list, previous=floors)
        print("floors after the cases:", json.dumps(floors["runs"][1]), flush=True)
        report["floors"] = floors
        report["results"] = attach_floors(report["results"], floors)
    out = args.out or (None if args.quick else default_out())
    if args.merge and out and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        fresh = {key_of(r) + (r["impl"],) for r in report["results"]}
        kept = [r for r in previous["results"] if key_of(r) + (r["impl"],) not in fresh]
        report["results"] = kept + report["results"]
        report["runs"] = previous.get("runs", [previous["settings"]]) + [report["settings"]]
        if previous.get("floors"):  # the kept rows carry their own run's floors
            report["earlier_floors"] = previous.get("earlier_floors", []) + [previous["floors"]]
    report["speedups"] = speedups(report["results"])
    print("\n" + markdown_table(report["results"]))
    print("\nsppo_fast against the others (fwd+bwd time ratios, theirs / ours):")
    for s in report["speedups"]:
        print(json.dumps(s))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        write_reports(report, out, not args.no_plot)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
