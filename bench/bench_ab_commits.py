"""Old commit against new, side by side: times one fused loss, forward + backward, of whichever sppo_fast
is first on PYTHONPATH (a checkout of another commit with its built extension, or this one); prints the
median of `reps` as JSON. Interleave the two commits' runs (bench/results/core-redesign-*.md has the loop):

    PYTHONPATH=/path/to/old/checkout python bench/bench_ab_commits.py linear-fp32-32000 5

Cases: linear-{fp32,bf16}-V (SPPO, 8 x 256 tokens, H 512, 32-token prompts masked), logits-{fp32,bf16}-V
(SPPO on (8, 256, V) logits), packed-long[-PRESET] (4 packed sequences of 1024 tokens, the first half of each
masked, V 32000, H 512), kernel-{forward,backward}-{fp32,bf16}-V (the CPU backend's kernel alone on 2048 x V
logits; the backward out of place, its gradient dropped after each call as a trainer drops it)."""
import json
import statistics
import sys
import time

import torch

import sppo_fast as sf

torch.manual_seed(0)
case = sys.argv[1]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7


def timed(fn):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def batch(B, T, prompt, dtype=torch.float32):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :prompt] = False
    return dict(old_logp=-torch.rand(B, T), advantages=torch.randn(B), mask=mask)


if case.startswith("linear"):
    _, dt, V = case.split("-")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[dt]
    V, H, B, T = int(V), 512, 8, 256
    hidden = (torch.randn(B, T, H) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(int(V), H) * 0.05).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    b = batch(B, T, 32)
    cfg = sf.PolicyLossConfig.preset("sppo")

    def run():
        out = sf.fused_linear_policy_loss(hidden, weight, targets, b["old_logp"], b["advantages"], b["mask"], cfg)
        out.loss.backward()
        hidden.grad = weight.grad = None
elif case.startswith("logits"):
    _, dt, V = case.split("-")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[dt]
    V, B, T = int(V), 8, 256
    logits = (torch.randn(B, T, V) * 2).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    b = batch(B, T, 0)
    cfg = sf.PolicyLossConfig.preset("sppo")

    def run():
        out = sf.fused_policy_loss(logits, targets, b["old_logp"], b["advantages"], b["mask"], cfg)
        out.loss.backward()
        logits.grad = None
elif case.startswith("kernel-"):
    _, which, dt, V = case.split("-")
    from sppo_fast.backends import native

    V = int(V)
    logits = (torch.randn(2048, V) * 2).to(dict(fp32=torch.float32, bf16=torch.bfloat16)[dt])
    targets = torch.randint(0, V, (2048,))
    logp, entropy, lse = native.token_logprobs_forward(logits, targets, 1.0, -100, True, torch.float64)
    g_logp, g_ent = torch.randn(2048), torch.randn(2048)

    def run():
        if which == "forward":
            native.token_logprobs_forward(logits, targets, 1.0, -100, True, torch.float64)
        else:
            native.token_logprobs_backward(logits, targets, lse, entropy, g_logp, g_ent, 1.0, -100, False)
elif case.startswith("packed-long"):  # 4 sequences of 1024 tokens, half of each masked (its prompt), V=32000
    V, H, S, L = 32000, 512, 4, 1024
    N = S * L
    hidden = (torch.randn(N, H) * 0.5).requires_grad_(True)
    weight = (torch.randn(V, H) * 0.05).requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    mask = torch.ones(S, L, dtype=torch.bool)
    mask[:, :L // 2] = False
    cu = torch.arange(0, N + 1, L, dtype=torch.int32)
    cfg = sf.PolicyLossConfig.preset(case.split("-")[2] if case.count("-") == 2 else "sppo")
    old, adv = -torch.rand(N), torch.randn(S)

    def run():
        out = sf.fused_linear_policy_loss(hidden, weight, targets, old, adv, mask.reshape(-1), cfg, cu_seqlens=cu)
        out.loss.backward()
        hidden.grad = weight.grad = None
print(json.dumps({"case": case, "median_s": timed(run), "torch_threads": torch.get_num_threads()}))
