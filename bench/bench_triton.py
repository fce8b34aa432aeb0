"""GPU benchmark of the Triton path: forward and forward+backward time and peak memory of
(1) token_logprobs (log-probs and entropy from logits) and (2) a GRPO/DAPO policy loss from logits, for
4k, 16k and 64k tokens x vocabularies of 32k and 152k, against the idiomatic PyTorch loss, its
torch.compile and Liger-Kernel's Triton GRPO loss. Results go to bench/results/triton_<gpu>.json and, as a table,
bench/results/triton_<gpu>.md.

    python bench/bench_triton.py                       # everything (about 10-20 minutes on an H100)
    python bench/bench_triton.py --tokens 4096 --vocab 151936 --impls sppo_fast liger
    python bench/bench_triton.py --smoke               # tiny shapes, any device, to check the script
    python bench/bench_triton.py --compile-only        # no GPU needed: compile every kernel and config
                                                       # for sm_80/sm_90a/gfx942, registers and spills
                                                       # (bench/triton_compile_report.py)

What is timed (median of --reps runs after --warmup runs, CUDA events):
  fwd      the op under torch.no_grad() (computing old/ref log-probs, no activations kept);
  fwd_bwd  the op with logits.requires_grad, then backward of the loss (for token_logprobs, of a fixed
           random combination of logp and entropy), i.e. one training step of this stage.
Peak memory is torch.cuda.max_memory_allocated() during one run, minus what the inputs already held.
Every implementation gets its own freshly allocated inputs (64k x 152k bf16 logits are 20 GiB), and an
out-of-memory run is recorded as "oom", not fatal. The first call of each (autotuning for the Triton
kernels, compilation for torch.compile) is timed separately as first_call_s.

Implementations:
  torch_eager         the idiomatic loss a trainer writes without a fused kernel: fp32 log_softmax + gather,
                      entropy -(p * logp).sum(-1), then the same (B, T) loss stage (sppo_fast.policy_loss)
  torch_compile       torch.compile of torch_eager
  sppo_fast           sppo_fast.token_logprobs / fused_policy_loss on the Triton backend
  sppo_fast_inplace   the same with inplace_backward=True (the gradient overwrites the logits)
  liger               liger_kernel's triton_grpo_loss (loss_type="dapo", inplace), GRPO loss only: Liger
                      has no differentiable log-prob + entropy op to compare for token_logprobs
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

OPS = ("token_logprobs", "grpo_loss")
IMPLS = ("torch_eager", "torch_compile", "sppo_fast", "sppo_fast_inplace", "liger")
TOKENS = (4096, 16384, 65536)
VOCABS = (32000, 151936)
SEQ_LEN = 1024  # tokens per sequence: B = tokens / SEQ_LEN sequences
KL_COEF = 0.04
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--vocab", nargs="+", type=int, default=list(VOCABS))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/triton_<gpu>.json)")
    p.add_argument("--compile-only", action="store_true",
                   help="run bench/triton_compile_report.py instead (no GPU needed)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on any device (on CPU through the Triton interpreter): checks the "
                        "script, measures nothing")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Inputs and the functions under test


def make_inputs(tokens, vocab, dtype, device, seed=0):
    """Logits (B, T, V) and the (B, T) tensors of one GRPO micro-batch; Liger's logits carry one more
    position per sequence (it drops the last), so they are made by `liger_logits` only when needed."""
    seq = min(SEQ_LEN, tokens)
    batch = tokens // seq
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen, device=device, dtype=dtype).mul_(2.0)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    old_logp = -torch.rand(batch, seq, generator=gen, device=device) * 10 - 2  # around the true ~log(1/V)
    ref_logp = old_logp + 0.05 * torch.randn(batch, seq, generator=gen, device=device)
    advantages = torch.randn(batch, generator=gen, device=device)
    mask = torch.ones(batch, seq, device=device)
    mask[:, seq - seq // 8:] = 0  # some padding, as in any RL batch
    g_logp = torch.randn(batch, seq, generator=gen, device=device)
    g_ent = torch.randn(batch, seq, generator=gen, device=device)
    return dict(logits=logits, targets=targets, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                mask=mask, g_logp=g_logp, g_ent=g_ent)


def loss_config():
    import sppo_fast as sf

    return sf.PolicyLossConfig.preset("dapo", kl_coef=KL_COEF, kl_estimator="k3")


def idiomatic_logprobs(x, targets, temperature):
    """What a trainer writes without a fused kernel (as in sppo_fast/bench/ops.py): fp32 log_softmax,
    gather, entropy -(p log p). Never sppo_fast.reference: that is the tests' oracle, slow on purpose."""
    logp_all = torch.log_softmax(x.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def build_fn(op, impl, temperature):
    """fn(logits, inputs) -> scalar loss to backpropagate (its value alone, for the forward)."""
    import sppo_fast as sf

    config = loss_config()
    if op == "token_logprobs":
        def mix(logp, ent, g_logp, g_ent):
            return (logp * g_logp).sum() + (ent * g_ent).sum()

        def ours(x, inp, **kw):
            return mix(*sf.token_logprobs(x, inp["targets"], temperature=temperature, return_entropy=True, **kw),
                       inp["g_logp"], inp["g_ent"])

        def torch_loss(x, targets, g_logp, g_ent):
            return mix(*idiomatic_logprobs(x, targets, temperature), g_logp, g_ent)

        keys = ("targets", "g_logp", "g_ent")
        impls = {"sppo_fast": ours, "sppo_fast_inplace": lambda x, inp: ours(x, inp, inplace_backward=True)}
    else:
        def ours(x, inp, **kw):
            return sf.fused_policy_loss(x, inp["targets"], inp["old_logp"], inp["advantages"], inp["mask"], config,
                                        ref_logp=inp["ref_logp"], temperature=temperature, **kw).loss

        def torch_loss(x, targets, old_logp, advantages, mask, ref_logp):
            logp, ent = idiomatic_logprobs(x, targets, temperature)
            return sf.policy_loss(logp, old_logp, advantages, mask, config, entropy=ent, ref_logp=ref_logp).loss

        keys = ("targets", "old_logp", "advantages", "mask", "ref_logp")
        impls = {"sppo_fast": ours, "sppo_fast_inplace": lambda x, inp: ours(x, inp, inplace_backward=True),
                 "liger": lambda x, inp: liger_loss(x, inp, config, temperature)}
    if impl in ("torch_eager", "torch_compile"):
        fn = torch.compile(torch_loss) if impl == "torch_compile" else torch_loss
        return lambda x, inp: fn(x, *(inp[k] for k in keys))  # tensors as graph inputs, not constants
    return impls.get(impl)


def liger_loss(x, inp, config, temperature):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(x, inp["old_logp"], inp["ref_logp"], inp["targets"], inp["advantages"], inp["mask"],
                               temperature=temperature, beta=KL_COEF, eps_low=config.clip_low,
                               eps_high=config.clip_high, inplace=True, loss_type="dapo", reduce=True)
    return loss


# ----------------------------------------------------------------------------------------------------
# Measurement


class Clock:
    """CUDA events on a GPU; wall time elsewhere (smoke runs only)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, reps):
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_extra_mib(self, fn):
        """Peak allocated memory during fn beyond what was allocated before it (None off-GPU)."""
        if not self.cuda:
            fn()
            return None
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(op, impl, tokens, vocab, args, device, clock):
    """One row of results: timings and memory of fwd and fwd_bwd, or the reason there are none."""
    row = {"op": op, "impl": impl, "tokens": tokens, "vocab": vocab, "dtype": args.dtype,
           "temperature": args.temperature}
    inp = None
    try:
        fn = build_fn(op, impl, args.temperature)
        if fn is None:
            return dict(row, status="n/a: no such op in this implementation")
        inp = make_inputs(tokens, vocab, DTYPES[args.dtype], device)
        if impl == "liger":  # Liger reads (B, T+1, V) logits and drops the last position itself
            inp["logits"] = torch.cat([inp["logits"], inp["logits"][:, -1:]], dim=1)
        row["inputs_mib"] = sum(t.numel() * t.element_size() for t in inp.values()) / 2**20
        logits = inp["logits"].requires_grad_(True)

        def forward():
            with torch.no_grad():
                fn(logits, inp)

        def forward_backward():
            logits.grad = None
            fn(logits, inp).backward()

        t0 = time.perf_counter()
        forward_backward()
        forward()
        clock.sync()
        row["first_call_s"] = time.perf_counter() - t0  # autotuning / compilation included
        for _ in range(args.warmup):
            forward_backward()
        row["fwd_ms"] = clock.time_ms(forward, args.reps)
        row["fwd_bwd_ms"] = clock.time_ms(forward_backward, args.reps)
        row["fwd_peak_extra_mib"] = clock.peak_extra_mib(forward)
        logits.grad = None
        row["fwd_bwd_peak_extra_mib"] = clock.peak_extra_mib(forward_backward)
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # one failing implementation must not lose the others' numbers
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        inp = None  # the next implementation gets the memory back
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def agreement(args, device):
    """Before timing anything: the fused loss and its gradient against the oracle (sppo_fast.reference),
    on the smallest shape, so that a broken kernel cannot produce good-looking numbers."""
    import sppo_fast as sf
    from sppo_fast import reference

    inp = make_inputs(min(args.tokens), min(args.vocab), DTYPES[args.dtype], device, seed=1)
    config = loss_config()
    results = {}
    for name, module in (("sppo_fast", sf), ("oracle", reference)):
        x = inp["logits"].detach().clone().requires_grad_(True)
        out = module.fused_policy_loss(x, inp["targets"], inp["old_logp"], inp["advantages"], inp["mask"],
                                       config, ref_logp=inp["ref_logp"], temperature=args.temperature)
        out.loss.backward()
        results[name] = (out.loss.detach().double(), out.logp.double(), x.grad.double())
    ours, ref = results["sppo_fast"], results["oracle"]
    report = {"loss_abs_diff": (ours[0] - ref[0]).abs().item(),
              "logp_max_abs_diff": (ours[1] - ref[1]).abs().max().item(),
              "grad_max_abs_diff": (ours[2] - ref[2]).abs().max().item(),
              "grad_max_abs": ref[2].abs().max().item()}
    report["ok"] = report["logp_max_abs_diff"] < 1e-3 and report["grad_max_abs_diff"] <= 1e-2 * max(
        report["grad_max_abs"], 1e-30)
    return report


def environment(device):
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except Exception as exc:
        env["liger_kernel"] = f"unavailable ({type(exc).__name__})"
    return env


def default_out(env):
    slug = "".join(c if c.isalnum() else "_" for c in env["device"].lower()).strip("_") or "device"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"triton_{slug}.json")


def autotune_choices():
    """The forward kernel's config chosen by the autotuner for each key it met (the key holds V, the
    row bucket, the flags and the argument dtypes); none under the interpreter, which does not tune."""
    import triton

    from sppo_fast.kernels import token_logprobs_forward as fwd

    if not isinstance(fwd._launch, triton.runtime.Autotuner):
        return []
    return [{"key": [str(k) for k in key], "config": str(config)} for key, config in fwd._launch.cache.items()]


def markdown(report):
    """The GPU table: one line per (op, tokens, vocab, implementation), times and peak memory, and each
    time as a multiple of sppo_fast's in the same case."""
    env = report["environment"]
    lines = [f"# Triton path on {env['device']}", "",
             f"`python bench/bench_triton.py`, {env['date']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['backend']}, dtype {report['settings']['dtype']}; median of {report['settings']['reps']} runs. "
             "Peak: memory allocated above the inputs. Ratios: time / sppo_fast's time in the same case.", "",
             "| op | tokens | V | impl | fwd ms | fwd+bwd ms | fwd+bwd vs sppo_fast | fwd+bwd peak MiB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["op"], r["tokens"], r["vocab"]): r for r in report["results"]
            if r["impl"] == "sppo_fast" and r["status"] == "ok"}

    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    for r in report["results"]:
        base = ours.get((r["op"], r["tokens"], r["vocab"]))
        ratio = (r["fwd_bwd_ms"] / base["fwd_bwd_ms"]) if base and r["status"] == "ok" else None
        lines.append(f"| {r['op']} | {r['tokens']} | {r['vocab']} | {r['impl']} | {cell(r.get('fwd_ms'), '.2f')} | "
                     f"{cell(r.get('fwd_bwd_ms'), '.2f')} | {cell(ratio, '.2f')} | "
                     f"{cell(r.get('fwd_bwd_peak_extra_mib'), '.0f')} | {r['status']} |")
    if report.get("autotuned"):
        lines += ["", "Forward configs chosen by the autotuner (key: V, row bucket, flags, dtypes):", ""]
        lines += [f"- `{', '.join(c['key'])}`: {c['config']}" for c in report["autotuned"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.compile_only:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import triton_compile_report

        return triton_compile_report.main(["--check"])
    if args.smoke:
        args.tokens, args.vocab, args.reps, args.warmup = [64], [1000], 1, 0
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before sppo_fast imports the kernels
    elif not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA GPU: the Triton kernels compile only for one, and timings of "
              "the CPU interpreter mean nothing. (Use --smoke to check the script itself on CPU.)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import sppo_fast as sf

    info = sf.backend_info()
    if not info[device.type].startswith("triton"):
        os.environ["SPPO_FAST_BACKEND"] = "triton"  # smoke on CPU: the interpreter, not the native kernels
    env = environment(device)
    env["backend"] = sf.backend_info()[device.type]
    report = {"environment": env, "settings": vars(args), "agreement": agreement(args, device), "results": []}
    print(json.dumps(report["environment"], indent=1), "\nagreement:", report["agreement"], flush=True)
    if not report["agreement"]["ok"]:
        print("the fused loss disagrees with the oracle: not timing a wrong kernel", file=sys.stderr)
        return 1
    for op in args.ops:
        for tokens in args.tokens:
            for vocab in args.vocab:
                for impl in args.impls:
                    row = run_case(op, impl, tokens, vocab, args, device, Clock(device))
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
    report["autotuned"] = autotune_choices()
    out = args.out or (None if args.smoke else default_out(env))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        table = os.path.splitext(out)[0] + ".md"
        with open(table, "w") as f:
            f.write(markdown(report))
        print(markdown(report), f"\nwrote {out} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
