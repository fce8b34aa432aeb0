"""One real TRL 1.16 GRPO training step at vocabulary 151936: TRL's default loss path against sppo-fast's
(`sppo_fast.integrations.trl.SppoFastGRPOTrainer`) and, by hand, Liger-Kernel's LigerFusedLinearGRPOLoss
and PyTorch 2.13's chunked F.linear_cross_entropy.

    python bench/bench_trl_step.py                 # 2048 and 4096 completion tokens, every path
    python bench/bench_trl_step.py --tokens 2048 --impls trl sppo_fast

The model is a tiny Qwen2 built from a config (H = 512, 2 layers, V = 151936, untied lm_head, fp32,
no autocast: bf16=False, so every path runs the head in fp32), one prompt of 64 tokens and one
completion of T tokens, TRL's default `dapo` loss and gradient checkpointing. Each (path, T) runs in
its own child process: it builds the trainer, allocates every parameter's `.grad` (as after the first
step of a run), runs one untimed step (plus `warmup`), then measures `reps` more: `trainer.training_step` (TRL's
`_prepare_inputs` from its buffer, `compute_loss`, `accelerator.backward`: forward and backward
through the model and the loss). Reported: the median step time, and the largest peak resident memory
of a step above the resident set at its start (glibc told to return freed memory at once, the kernel's
high-water mark reset before the step: sppo_fast/bench/harness.py explains the method).

The liger path replaces `_compute_loss` by about twenty lines around LigerFusedLinearGRPOLoss (its
own chunked lm_head), which is what a TRL 1.16 user would have to write: it keeps none of TRL's
metrics or extras, so it is a memory and time reference only. The torch_lce path is the same by hand
around PyTorch 2.13's `F.linear_cross_entropy(reduction="none")` with its default
`LinearCrossEntropyOptions()` (per-token log-probs: sppo_fast.trainer.loss_impls.torch_lce_logprobs),
or, as torch_lce_tuned, with 512 rows per chunk (LCE_CHUNK),
then the DAPO loss stage of `sppo_fast.policy_loss` with TRL's clip bounds: no entropy, no metrics,
a memory and time reference only as well."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sppo_fast.bench.harness import _faithful_rss as faithful_rss
from sppo_fast.bench.harness import machine_slug, peak_extra_mib

HIDDEN, VOCAB, LAYERS, PROMPT = 512, 151936, 2, 64
IMPLS = ("trl", "sppo_fast", "liger", "torch_lce", "torch_lce_tuned")
LCE_CHUNK = 512  # torch_lce_tuned's rows per chunk (torch's own choice at fp32 on CPU: 2 V / H chunks of any length)


def build_trainer(impl, tokens):
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from sppo_fast.integrations.trl import SppoFastGRPOTrainer
    from sppo_fast.trainer.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=PROMPT + tokens + 8, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = Qwen2ForCausalLM(config)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=tokens, num_iterations=2, bf16=False, use_cpu=True, report_to=[],
                      save_strategy="no")
    cls = SppoFastGRPOTrainer if impl == "sppo_fast" else GRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}), processing_class=tokenizer)
    if impl == "liger":
        trainer._compute_loss = liger_compute_loss(trainer)
    if impl.startswith("torch_lce"):
        trainer._compute_loss = torch_lce_compute_loss(trainer, LCE_CHUNK if impl == "torch_lce_tuned" else None)
    if args.gradient_checkpointing:  # Trainer.train() would turn it on
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    return trainer


def completion_hidden(model, inputs):
    """The last hidden states that predict the completion tokens, (B, K, H), as TRL's _compute_loss takes them."""
    import torch

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    return model(input_ids=ids, attention_mask=mask, sppo_fast_hidden=True)[:, -k - 1:-1]


def liger_compute_loss(trainer):
    """GRPOTrainer._compute_loss by hand around Liger's fused linear GRPO loss (dapo, no KL)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from sppo_fast.integrations.trl import add_hidden_state_forward

    add_hidden_state_forward(trainer.model)
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=False,
                                       epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                                       temperature=trainer.temperature)

    def compute_loss(model, inputs):
        hidden = completion_hidden(model, inputs)
        head = trainer.model.lm_head
        loss, _ = loss_fn(hidden, head.weight, inputs["completion_ids"], inputs["completion_mask"],
                          inputs["advantages"], bias=head.bias, old_per_token_logps=inputs["old_per_token_logps"])
        return loss

    return compute_loss


def torch_lce_compute_loss(trainer, chunk_size=None):
    """GRPOTrainer._compute_loss by hand around PyTorch 2.13's chunked F.linear_cross_entropy (per-token
    log-probs; torch's default options, or `chunk_size` rows per chunk), then the DAPO loss (token-mean,
    TRL's clip bounds, no KL, no entropy)."""
    import sppo_fast
    from sppo_fast.integrations.trl import add_hidden_state_forward
    from sppo_fast.trainer.loss_impls import torch_lce_logprobs

    add_hidden_state_forward(trainer.model)
    config = sppo_fast.PolicyLossConfig(clip_low=trainer.epsilon_low, clip_high=trainer.epsilon_high,
                                        aggregation="token-mean")

    def compute_loss(model, inputs):
        hidden = completion_hidden(model, inputs)
        head = trainer.model.lm_head
        logp = torch_lce_logprobs(hidden, head.weight, inputs["completion_ids"], head.bias,
                                  temperature=trainer.temperature, chunk_size=chunk_size)
        return sppo_fast.policy_loss(logp, inputs["old_per_token_logps"], inputs["advantages"],
                                     inputs["completion_mask"].float(), config).loss

    return compute_loss


def make_inputs(tokens):
    import torch

    g = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(100, VOCAB, (1, tokens), generator=g)
    mask = torch.ones(1, tokens, dtype=torch.long)
    return {"prompt_ids": torch.randint(100, VOCAB, (1, PROMPT), generator=g),
            "prompt_mask": torch.ones(1, PROMPT, dtype=torch.long),
            "completion_ids": completion_ids, "completion_mask": mask,
            "advantages": torch.tensor([0.7]),
            # near a random model's log-probs, so both branches of the clip are exercised
            "old_per_token_logps": -12.0 + 0.3 * torch.randn(1, tokens, generator=g),
            "num_items_in_batch": mask.sum()}


def child(impl, tokens, warmup, reps):
    import torch

    trainer = build_trainer(impl, tokens)
    model = trainer.model
    for p in model.parameters():  # parameter gradients already allocated, as after a first step
        p.grad = torch.zeros_like(p)
    inputs = make_inputs(tokens)
    trainer.current_gradient_accumulation_steps = 1
    # step 1 of a num_iterations=2 generation: training_step takes its batch from the buffer (no sampling)
    trainer._buffered_inputs = [inputs]

    def step():
        trainer._step = 1
        return trainer.training_step(model, inputs, None)

    t0 = time.perf_counter()
    loss = float(step())  # the first step pays one-time costs (page faults, lazy initialisation)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    faithful_rss()  # the resident set follows the live tensors (sppo_fast/bench/harness.py)
    times, peaks = [], []
    for _ in range(reps):  # each timed step is also measured for memory (the measurement costs ~nothing)
        t0 = time.perf_counter()
        peaks.append(peak_extra_mib(step)[0])  # RSS peak above the start, the gradient pool emptied first
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "tokens": tokens, "loss": loss, "first_step_s": round(first, 2),
            "step_s": round(statistics.median(times), 2), "step_times_s": [round(t, 2) for t in times],
            "peak_mib": round(max(peaks), 1), "peaks_mib": [round(m, 1) for m in peaks],
            "lm_head_grad_mib": round(VOCAB * HIDDEN * 4 / 2**20, 1)}


def _now_and_load():
    import datetime

    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), load


def run_case(impl, tokens, warmup, reps, timeout):
    started, load = _now_and_load()
    result = _run_child(impl, tokens, warmup, reps, timeout)
    return dict(result, started=started, loadavg_1min_at_start=load)


def _run_child(impl, tokens, warmup, reps, timeout):
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_trl_step as b; "
            "print('RESULT ' + json.dumps(b.child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))")
    cmd = [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), impl, str(tokens), str(warmup),
           str(reps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "tokens": tokens, "status": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]), status="ok")
    return {"impl": impl, "tokens": tokens, "status": "failed: " + proc.stderr.strip().splitlines()[-1][:300]}


def environment():
    from importlib.metadata import version

    from sppo_fast.bench.harness import environment as base

    env = base()
    for pkg in ("trl", "transformers", "accelerate"):
        env[pkg] = version(pkg)
    with open("/proc/loadavg") as f:
        env["loadavg_at_start"] = f.read().split()[:3]
    return env


def _times(ratio, better, worse):
    """TRL's figure / ours as words: "2.4x faster", or "4.6x slower" where ours is the larger."""
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


def markdown(report):
    rows = report["results"]
    by = {(r["impl"], r["tokens"]): r for r in rows}
    lines = [f"TRL GRPO step, tiny Qwen2 H={HIDDEN} V={VOCAB} ({LAYERS} layers, fp32), 1 completion, dapo; "
             f"{report['env']['cpu']}, {report['env']['cores']} cores, load average at start "
             f"{' '.join(report['env']['loadavg_at_start'])} (shared machine: times are noisy)", "",
             "| tokens | path | peak above start | vs TRL | step time (median) | vs TRL | started (UTC), load |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['tokens']} | {r['impl']} | {r['status']} | | | | |")
            continue
        base = by.get(("trl", r["tokens"]))
        ok = base is not None and base.get("status") == "ok"
        mem = _times(base["peak_mib"] / r["peak_mib"], "lower", "higher") if ok and r["impl"] != "trl" else ""
        speed = _times(base["step_s"] / r["step_s"], "faster", "slower") if ok and r["impl"] != "trl" else ""
        when = f"{r.get('started', '?')[11:19]}, {r.get('loadavg_1min_at_start', '?')}"
        lines.append(f"| {r['tokens']} | {r['impl']} | {r['peak_mib']:.0f} MiB | {mem} | {r['step_s']:.1f} s | "
                     f"{speed} | {when} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=0, help="untimed steps after the first")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    p.add_argument("--out", default=None,
                   help="path without extension (default bench/results/trl-step-<cpu>-<isa>-<N>core)")
    p.add_argument("--merge", default=None, help="a JSON-lines file of results of an earlier run to report with")
    a = p.parse_args(argv)
    env = environment()
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"trl-step-{machine_slug()}")
    results = []
    if a.merge:  # rows printed by an earlier invocation (one JSON object per line), reported alongside
        with open(a.merge) as f:
            results = [json.loads(line) for line in f if line.startswith("{")]
    for tokens in a.tokens:
        for impl in a.impls:  # side by side: every path at one length before the next length
            r = run_case(impl, tokens, a.warmup, a.reps, a.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
    report = {"env": env, "model": {"hidden": HIDDEN, "vocab": VOCAB, "layers": LAYERS, "prompt": PROMPT},
              "warmup": a.warmup, "reps": a.reps, "results": results}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
