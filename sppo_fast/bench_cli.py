"""`sppo-fast bench` (also `python bench/bench_ops.py`): the CPU benchmark of the fused ops against
what users actually run.

Times forward and forward+backward and measures peak memory of
  token_logprobs      log-probs + entropy from (B, T, V) logits, backward of a fixed random mix of both;
  fused_policy_loss   the policy loss straight from logits, presets dapo (default), gspo and sspo;
  fused_linear        the policy loss from hidden states x lm_head (dapo, with entropy), never holding
                      the logits;
for each implementation, side by side in one run:
  sppo_fast           the op on the native CPU backend (csrc/)
  sppo_fast_inplace   the same with inplace_backward=True (the gradient overwrites the logits)
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
  oracle              sppo_fast.reference, the fp64-grade oracle of the tests (several passes on purpose):
                      only with --impls oracle, and labelled as such, never a baseline
Every implementation also returns the mean entropy (the metric a trainer logs), so compile cannot drop
the entropy as dead code.

How it measures. Every (case, implementation) runs in its own child process, so that compilation
caches, allocator state and peak RSS of one cannot leak into another. In the child: inputs are built,
the first call (compilation included) is timed as first_call_s, `warmup` more calls run, then the
median wall time of `reps` calls of the forward (under no_grad) and of forward+backward
(torch.autograd.grad of the loss with respect to the logits, or hidden and weight for the linear
case). The in-place variant restores its logits from a pristine copy before each call, outside the
timed region. Peak memory: there is no allocator counter on CPU, so the child measures the resident
set: glibc is first told to serve every allocation of 64 KiB or more with its own mmap and to return
freed memory at once (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so the resident set follows the
live tensors; then the kernel's high-water mark is reset (/proc/self/clear_refs), one call runs, and
peak_mib = VmHWM - VmRSS before the call: memory above the inputs, the results of the call included
(the gradient of fwd_bwd). Cases whose eager run would need more than --max-gib are skipped.
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

OPS = ("token_logprobs", "fused_policy_loss", "fused_linear")
PRESETS = ("dapo", "gspo", "sspo")
IMPLS = {"token_logprobs": ("sppo_fast", "sppo_fast_inplace", "torch_compile", "torch_eager"),
         "fused_policy_loss": ("sppo_fast", "sppo_fast_inplace", "torch_compile", "torch_eager", "verl_compile",
                               "verl_eager", "trl_compile", "trl_eager"),
         "fused_linear": ("sppo_fast", "torch_compile", "liger", "cce", "trl_chunked")}
PEER_IMPLS = ("verl_compile", "verl_eager", "trl_compile", "trl_eager")  # their loss is the dapo one
ORACLE = "oracle"  # sppo_fast.reference: only with --impls oracle, never in the default tables
TOKENS = (2048,)  # the size of the targets
SHAPES = ("fp32:32000", "bf16:151936")  # the two target shapes: dtype:V
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 512  # tokens per sequence: B = tokens / SEQ_LEN
SEGMENT_LEN = 32  # SSPO: tokens per segment of the synthetic segment ids
HIDDEN = 512  # the linear case's hidden size
EAGER_LOGITS_COPIES = 5  # an eager fwd+bwd holds about this many logits-sized fp32 tensors


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
    p.add_argument("--linear-vocab", nargs="+", type=int, default=[32000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=18.0, help="skip cases whose eager run would need more")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script in about a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-<N>core.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing --out file that this run does not measure again")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md and .png of an existing --out file without measuring")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.shapes, args.linear_tokens, args.linear_vocab = [256], [("fp32", 4096)], [256], [4096]
        args.reps, args.warmup = 3, 1
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
    PyTorch) with the preset; returns (loss, mean entropy), the entropy as the metric a trainer logs."""
    import sppo_fast as sf

    out = sf.policy_loss(logp, inp["old_logp"], inp["advantages"], inp["mask"], _config(preset), entropy=entropy,
                         **_loss_kwargs(inp, preset))
    return out.loss, out.metrics["entropy"]


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
            "torch": lambda x, inp: _policy_loss(*idiomatic_logprobs(x, inp["targets"]), inp, config, preset),
            "trl": lambda x, inp: _policy_loss(*trl_logprobs(x, inp["targets"]), inp, config, preset),
            "oracle": lambda x, inp: _policy_loss(*reference.token_logprobs(x, inp["targets"], return_entropy=True),
                                                  inp, config, preset)}[impl]


def linear_fn(impl):
    """fn((hidden, weight), inp) -> (loss, logged extra) for the linear case (dapo)."""
    import sppo_fast as sf

    config = _config("dapo")
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
    if impl == "sppo_fast":
        def native(x, inp):
            out = sf.fused_linear_policy_loss(x[0], x[1], inp["targets"], inp["old_logp"], inp["advantages"],
                                              inp["mask"], config)
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


def build_fn(op, impl, preset):
    """fn(x, inp) -> scalar loss, where x is the logits (or (hidden, weight) for fused_linear); the
    `_compile` suffix is torch.compile of the eager implementation of that name."""
    base, compiled = (impl[:-len("_compile")], True) if impl.endswith("_compile") else (impl.removesuffix("_eager"),
                                                                                           False)
    fn = linear_fn(base) if op == "fused_linear" else from_logits_fn(op, base, preset)
    if compiled:
        return _compiled(fn)
    return lambda x, inp: fn(x, inp)[0]


# ----------------------------------------------------------------------------------------------------
# Measurement (in the child)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _faithful_rss():
    """Make the resident set follow live tensors (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 0)
    libc.malloc_trim(0)


def peak_extra_mib(fn):
    """(peak, held) in MiB: resident memory above what was resident before fn at fn's peak (results of
    fn included), and what sppo_fast's gradient pool holds once the results are dropped (it keeps the
    last gradient's block for the next call, as CUDA's caching allocator would; its own exact count,
    not the resident set, which glibc's heap blurs by a few MiB). The pool is emptied first, so that a
    block it kept from an earlier call does not hide in the baseline."""
    from sppo_fast import buffers

    buffers.empty_cache()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    gc.collect()
    return (peak - base) / 1024, buffers.cached_bytes() / 2**20


def median_ms(fn, reps, before=None):
    """(wall, CPU) medians in ms over reps calls. The CPU time of the process (all its threads) is
    the work done, which other jobs on the machine inflate much less than the wall time."""
    times, cpu = [], []
    for _ in range(reps):
        if before is not None:
            before()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        del out
    return statistics.median(times), statistics.median(cpu)


def run_child(case):
    """Measures one (case, implementation); returns the result fields."""
    op, impl, preset = case["op"], case["impl"], case.get("preset")
    dtype = DTYPES[case["dtype"]]
    hidden = HIDDEN if op == "fused_linear" else None
    inp = make_inputs(case["tokens"], case["vocab"], dtype, hidden=hidden)
    fn = build_fn(op, impl, preset)
    if op == "fused_linear":
        x = (inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True))
        wrt = list(x)
    else:
        x = inp["logits"].requires_grad_(True)
        wrt = [x]
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

    result = {}
    t0 = time.perf_counter()
    forward_backward()
    forward()
    result["first_call_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(case["warmup"]):
        if restore:
            restore()
        forward_backward()
    result["fwd_ms"], result["fwd_cpu_ms"] = median_ms(forward, case["reps"], restore)
    result["fwd_bwd_ms"], result["fwd_bwd_cpu_ms"] = median_ms(forward_backward, case["reps"], restore)
    _faithful_rss()
    if restore:
        restore()
    result["fwd_peak_mib"], _ = peak_extra_mib(forward)
    if restore:
        restore()
    result["fwd_bwd_peak_mib"], result["pool_held_mib"] = peak_extra_mib(forward_backward)
    return result


def child_main(case_json):
    case = json.loads(case_json)
    try:
        out = dict(run_child(case), status="ok")
    except Exception as exc:  # reported in the table, never fatal to the whole run
        out = {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


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
            for tokens in args.linear_tokens:
                for vocab in args.linear_vocab:
                    for impl in impls(op, "dapo"):
                        yield {"op": op, "impl": impl, "preset": "dapo", "tokens": tokens, "vocab": vocab,
                               "dtype": "fp32", "hidden": HIDDEN}
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
    return run_in_child("sppo_fast.bench_cli", dict(case, reps=args.reps, warmup=args.warmup), row, args.timeout)


def run_in_child(module, payload, row, timeout):
    """`module.child_main(json payload)` in a fresh process (its own peak memory, nothing cached from the
    cases before), which prints its result as a line `RESULT {json}`: the row with that result, or with
    a status saying why there is none. The load average on either side says how busy the machine was."""
    row = dict(row, load_before=round(os.getloadavg()[0], 2))  # other work on the machine skews timings
    code = f"import sys; from {module} import child_main; sys.exit(child_main(sys.argv[1]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status=f"timeout after {timeout:g} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(row, status=f"child failed (exit {proc.returncode}): {' | '.join(tail)[:300]}")
    return dict(row, **json.loads(lines[-1][len("RESULT "):]), load_after=round(os.getloadavg()[0], 2))


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


def environment():
    import sppo_fast as sf

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "python": platform.python_version(), "backend": sf.backend_info()["cpu"],
           "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"), "isa_flags": _isa_flags(),
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("liger-kernel", "cut-cross-entropy", "trl", "verl", "transformers"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    return env


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _isa_flags():
    """The vector ISA extensions /proc/cpuinfo lists that matter to these kernels."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                                                     "amx_bf16"))
    return []


def machine_slug(cpu, cores):
    """bench/results/<slug>: e.g. "AMD EPYC" and 2 cores -> "amd-epyc-2core"; the frequency, "(R)",
    "CPU", "Processor" and an "N-Core" of the model name dropped."""
    name = re.sub(r"\(r\)|\(tm\)|@.*$|\bcpu\b|\bprocessor\b|\b\d+-core\b", " ", cpu.lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"
    return f"{name}-{cores}core"


def _cpu_model():
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def default_out():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "bench", "results", machine_slug(_cpu_model(), os.cpu_count()) + ".json")


# ----------------------------------------------------------------------------------------------------
# Reporting


def _key(row):
    return (row["op"], row.get("preset"), row["dtype"], row["vocab"], row["tokens"])


def speedups(rows):
    """Per case, sppo_fast's ratios against the other implementations (time: theirs / ours)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(_key(r), {})[r["impl"]] = r
    out = []
    for key, impls in by_case.items():
        for ours_name in ("sppo_fast", "sppo_fast_inplace"):
            ours = impls.get(ours_name)
            if not ours or ours.get("status") != "ok":
                continue
            entry = {"op": key[0], "preset": key[1], "dtype": key[2], "vocab": key[3], "tokens": key[4],
                     "impl": ours_name, "fwd_bwd_ms": ours["fwd_bwd_ms"],
                     "peak_over_logits": round(ours["fwd_bwd_peak_mib"] / ours["logits_mib"], 3)
                     if key[0] != "fused_linear" else None}
            for other, r in impls.items():
                if other.startswith("sppo_fast") or r.get("status") != "ok":
                    continue
                entry[f"fwd_bwd_x_vs_{other}"] = round(r["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 2)
                entry[f"fwd_x_vs_{other}"] = round(r["fwd_ms"] / ours["fwd_ms"], 2)
            out.append(entry)
    return out


def markdown_table(rows):
    head = ("| op | preset | dtype | V | tokens | impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB "
            "(x logits) | pool holds MiB | first call s | load before, after |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        case = f"| {r['op']} | {r.get('preset') or ''} | {r['dtype']} | {r['vocab']} | {r['tokens']} | {r['impl']} |"
        if r.get("status") != "ok":
            lines.append(f"{case} {r['status']} | | | | | |")
            continue
        ratio = "" if r["op"] == "fused_linear" else f" ({r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x)"
        lines.append(f"{case} {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['fwd_bwd_peak_mib']:.0f}{ratio} | {r.get('pool_held_mib', float('nan')):.0f} | "
                     f"{r['first_call_s']:.1f} | {r.get('load_before')}, {r.get('load_after')} |")
    return "\n".join(lines)


IMPL_ORDER = ("sppo_fast", "sppo_fast_inplace", "torch_compile", "torch_eager", "verl_compile", "verl_eager",
              "trl_compile", "trl_eager", "trl_chunked", "liger", "cce", ORACLE)


def _by_case(rows):
    by_case = {}
    for r in rows:
        by_case.setdefault(_key(r), {})[r["impl"]] = r
    return sorted(by_case.items(), key=lambda kv: tuple(str(k) for k in kv[0]))


def _memory(r, linear):
    if linear:
        return f"{r['fwd_bwd_peak_mib']:.0f} MiB", f"{r.get('pool_held_mib', float('nan')):.0f} MiB"
    return (f"{r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x",
            f"{r.get('pool_held_mib', float('nan')) / r['logits_mib']:.2f}x")


def summary_table(rows):
    """One line per (case, implementation): fwd+bwd median, as a multiple of sppo_fast's, the forward
    alone, and memory above the inputs (peak during the call, and what sppo_fast's gradient pool holds
    after it) as a multiple of the logits' size (MiB for the linear case, whose logits the fused
    implementations never hold)."""
    lines = ["| op | dtype | V | tokens | impl | fwd+bwd ms | x sppo_fast | fwd+bwd CPU ms | fwd ms | peak | "
             "pool holds after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, impls in _by_case(rows):
        ours = impls.get("sppo_fast")
        base = ours["fwd_bwd_ms"] if ours and ours.get("status") == "ok" else None
        op = key[0] + (f" {key[1]}" if key[1] and key[0] != "fused_linear" else "")
        for name in sorted(impls, key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER)):
            r = impls[name]
            label = f"{name} (the fp64-grade oracle, not a baseline)" if name == ORACLE else name
            case = f"| {op} | {key[2]} | {key[3]} | {key[4]} | {label} |"
            if r.get("status") != "ok":
                lines.append(f"{case} {r['status'][:80]} | | | | | |")
                continue
            ratio = f"{r['fwd_bwd_ms'] / base:.2f}x" if base else ""
            peak, held = _memory(r, key[0] == "fused_linear")
            cpu = f"{r['fwd_bwd_cpu_ms']:.0f}" if "fwd_bwd_cpu_ms" in r else ""
            lines.append(f"{case} {r['fwd_bwd_ms']:.0f} | {ratio} | {cpu} | {r['fwd_ms']:.0f} | {peak} | {held} |")
    return "\n".join(lines)


def targets_table(rows):
    """Issue 12's targets, per case of fused_policy_loss: sppo_fast >= 3x torch.compile of the idiomatic
    loss (in place >= 5x), peak 1.00x the logits (0 in place), backward (fwd+bwd - fwd) <= 1.5x the
    forward."""
    lines = ["| case | sppo_fast vs torch_compile | in place vs torch_compile | the same in CPU time | "
             "peak (in place) | backward / forward (in place) |", "|---|---|---|---|---|---|"]
    for key, impls in _by_case(rows):
        if key[0] != "fused_policy_loss":
            continue
        ours, inplace, comp = (impls.get(n, {}) for n in ("sppo_fast", "sppo_fast_inplace", "torch_compile"))
        if not all(r.get("status") == "ok" for r in (ours, inplace, comp)):
            continue

        def bwd_over_fwd(r):
            return (r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"]

        x, xi = comp["fwd_bwd_ms"] / ours["fwd_bwd_ms"], comp["fwd_bwd_ms"] / inplace["fwd_bwd_ms"]
        cpu = "" if "fwd_bwd_cpu_ms" not in comp else ", ".join(
            f"{comp['fwd_bwd_cpu_ms'] / r['fwd_bwd_cpu_ms']:.2f}x" for r in (ours, inplace))
        mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        peak, peak_in = (r["fwd_bwd_peak_mib"] / r["logits_mib"] for r in (ours, inplace))
        lines.append(f"| {key[1]} {key[2]} V={key[3]} {key[4]} tokens | {x:.2f}x ({mark(x >= 3)}) | "
                     f"{xi:.2f}x ({mark(xi >= 5)}) | {cpu} | {peak:.2f}x ({peak_in:.2f}x) | "
                     f"{bwd_over_fwd(ours):.2f} ({bwd_over_fwd(inplace):.2f}) |")
    return "\n".join(lines)


def write_reports(report, out, plot_png=True):
    stem = os.path.splitext(out)[0]
    env = report["environment"]
    runs = report.get("runs", [report["settings"]])
    with open(stem + ".md", "w") as f:
        f.write(f"CPU benchmark: **{env['cpu']}**, {env['cores']} cores ({', '.join(env.get('isa_flags', []))}), "
                f"torch {env['torch']}, kernels: {env['backend']}; `python bench/bench_ops.py` "
                f"(method: bench/README.md), {len(runs)} run(s), the last on {env['date']}; load average "
                f"{env.get('load_average', 'not recorded')} at its start (other jobs on the machine slow every "
                "implementation; each row records the load before and after it).\n\n"
                "Medians of forward+backward, the forward alone (under no_grad), and memory above the inputs "
                "(peak during one call after warm-up, and what sppo_fast's gradient pool holds after it: the "
                "last gradient's block, kept for the next call), as a multiple of the logits' size (MiB for "
                "the linear case).\n\n")
        targets = targets_table(report["results"])
        if targets.count("\n") > 1:
            f.write("Issue 12's targets on this machine:\n\n" + targets + "\n\n")
        f.write(summary_table(report["results"]) + "\n\nEvery measurement:\n\n")
        f.write(markdown_table(report["results"]) + "\n")
    if plot_png and plot(report["results"], stem + ".png", env):
        print(f"wrote {stem}.png")
    print(f"wrote {stem}.md")


def plot(rows, path, env):
    """One panel per case: fwd+bwd median of each implementation (bars, log scale), its peak memory as
    a multiple of the logits written on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(key, {n: r for n, r in impls.items() if r.get("status") == "ok"}) for key, impls in _by_case(rows)]
    cases = [(key, impls) for key, impls in cases if impls]
    if not cases:
        return False
    fig, axes = plt.subplots(1, len(cases), figsize=(max(5.0, 3.4 * len(cases)), 4.4), squeeze=False)
    for ax, (key, impls) in zip(axes[0], cases):
        names = [n for n in IMPL_ORDER if n in impls]
        times = [impls[n]["fwd_bwd_ms"] for n in names]
        colors = ["tab:green" if n.startswith("sppo_fast") else "tab:gray" for n in names]
        ax.bar(range(len(names)), times, color=colors)
        for i, n in enumerate(names):
            r = impls[n]
            mem = (f"{r['fwd_bwd_peak_mib']:.0f}M" if key[0] == "fused_linear"
                   else f"{r['fwd_bwd_peak_mib'] / r['logits_mib']:.1f}x")
            ax.text(i, times[i], mem, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(min(times) / 4, max(times) * 2)  # room below the shortest bar, so its height shows
        ax.set_ylabel("fwd+bwd ms (median)", fontsize=8)
        ax.set_title(f"{key[0]}{' ' + key[1] if key[1] else ''}\n{key[2]} V={key[3]} {key[4]} tokens", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}\n(labels: peak memory)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long-cot" in argv:  # the whole-update-step benchmark has its own options
        from sppo_fast.bench_long_cot import main as long_cot_main

        return long_cot_main([a for a in argv if a != "--long-cot"])
    args = parse_args(argv)
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
    for case in cases(args):
        row = run_case(case, args)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    out = args.out or (None if args.quick else default_out())
    if args.merge and out and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        fresh = {_key(r) + (r["impl"],) for r in report["results"]}
        kept = [r for r in previous["results"] if _key(r) + (r["impl"],) not in fresh]
        report["results"] = kept + report["results"]
        report["runs"] = previous.get("runs", [previous["settings"]]) + [report["settings"]]
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
