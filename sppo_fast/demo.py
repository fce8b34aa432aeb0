"""`sppo-fast demo`: the fused SPPO loss on random data, beside the same loss in eager PyTorch."""

import argparse
import time

import torch

import sppo_fast as sf
from sppo_fast import reference


def parse(argv):
    p = argparse.ArgumentParser(prog="sppo-fast demo", description=__doc__)
    p.add_argument("--tokens", type=int, default=2048, help="B x T, the number of response tokens")
    p.add_argument("--seq-len", type=int, default=256, help="T, tokens per sequence")
    p.add_argument("--vocab", type=int, default=32000, help="V, the vocabulary size")
    p.add_argument("--preset", default="sppo", choices=sorted(sf.losses.PRESETS), help="loss preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="logits dtype")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    args = parse(argv)
    torch.manual_seed(args.seed)
    B, T, V = max(1, args.tokens // args.seq_len), args.seq_len, args.vocab
    dtype = getattr(torch, args.dtype)
    logits = (torch.randn(B, T, V) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T))
    mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1))).float()
    old_logp = sf.token_logprobs(logits, targets) + 0.05 * torch.randn(B, T)
    advantages = sf.sequence_advantage(torch.randint(0, 2, (B,)).float(), torch.randn(B))
    config = sf.PolicyLossConfig.preset(args.preset)
    segments = sf.segment_ids(targets, list(range(50)), mask=mask)
    print(f"{args.preset}: B={B} T={T} V={V} {args.dtype}; backends: {sf.backend_info()['cpu']}")

    def run(fn):
        x = logits.detach().requires_grad_(True)

        def step():
            out = fn(x, targets, old_logp, advantages, mask, config, segment_ids=segments)
            out.loss.backward()
            return out
        out, seconds = _timed(step)
        return out, x.grad, seconds

    fused, grad, t_fused = run(sf.fused_policy_loss)
    eager, grad_eager, t_eager = run(reference.fused_policy_loss)
    diff = (grad.float() - grad_eager.float()).abs().max().item()
    print(f"fused: loss {fused.loss.item():+.6f}  forward+backward {t_fused * 1e3:8.1f} ms")
    print(f"eager: loss {eager.loss.item():+.6f}  forward+backward {t_eager * 1e3:8.1f} ms")
    print(f"max |grad difference| {diff:.2e}; metrics: "
          + ", ".join(f"{k}={v.item():.4f}" for k, v in fused.metrics.items()))
    return 0
