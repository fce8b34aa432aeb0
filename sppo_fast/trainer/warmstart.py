"""Warm start: supervised fine-tuning on the task's worked solutions, so that RL starts from a policy
that is sometimes right. The result is cached on disk (safetensors, written atomically) under a key
made of everything that determines it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from sppo_fast.trainer.models import PolicyHidden, lm_head_of

SFT_WARMUP_FRACTION = 0.05
SFT_DENSE_LOGITS_LIMIT = 2**25  # logits elements (128 MiB in fp32) above which the SFT loss is chunked


def cache_root(cfg) -> str:
    return cfg.cache_dir or os.environ.get("SPPO_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sppo-fast")


def warm_start_key(cfg, model, tokenizer) -> str:
    """Hash of (task, model config, tokenizer, SFT hyper-parameters, seed)."""
    vocab = sorted(tokenizer.get_vocab().items())
    parts = {
        "task": [cfg.task, cfg.task_difficulty, cfg.task_path],
        "model": model.config.to_json_string(use_diff=False) if not cfg.model else os.path.abspath(cfg.model),
        "tokenizer": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "sft": [cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, cfg.sft_examples, SFT_WARMUP_FRACTION,
                cfg.sft_direct_fraction],
        "seed": cfg.seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(cfg, model, tokenizer) -> str:
    return os.path.join(cache_root(cfg), "warmstart", warm_start_key(cfg, model, tokenizer) + ".safetensors")


def load_cached(model, path: str) -> bool:
    if not os.path.exists(path):
        return False
    from safetensors.torch import load_model

    load_model(model, path, device=str(next(model.parameters()).device))
    return True


def save_atomic(model, path: str, metadata: dict):
    from safetensors.torch import save_model

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(model, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def sft_targets(examples, direct_fraction: float, generator) -> list[tuple[str, str]]:
    """(prompt, target) pairs: the worked solution, or for a `direct_fraction` of the examples only its
    final answer line. A warm start that mostly answers without working the steps out is what a base
    model that "sometimes reasons" looks like; RL then has something to discover: that reasoning pays."""
    direct = (torch.rand(len(examples), generator=generator) < direct_fraction).tolist()
    return [(ex.prompt, ex.solution.split("\n")[-1] if d else ex.solution) for ex, d in zip(examples, direct)]


def sft_batch(tokenizer, pairs, device):
    """Left-padded prompt + target + EOS, with a mask over the target tokens and EOS."""
    rows, loss_rows = [], []
    for prompt_text, target_text in pairs:
        prompt = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        target = tokenizer(target_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        loss_rows.append([0] * len(prompt) + [1] * len(target))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    loss_mask = torch.tensor([[0] * (width - len(r)) + m for r, m in zip(rows, loss_rows)], device=device)
    return ids, attn, loss_mask


def sft_loss(hidden_model, lm, ids, attn, loss_mask):
    """Mean cross-entropy of the solution tokens; logits only for the positions that predict them."""
    hidden = hidden_model(ids, attn)[:, :-1]
    targets, mask = ids[:, 1:], loss_mask[:, 1:].bool()
    weight, bias = lm_head_of(lm)
    rows = hidden[mask]
    if rows.shape[0] * weight.shape[0] > SFT_DENSE_LOGITS_LIMIT:
        # A real vocabulary (--vocab_size) on long solutions: 64 x 224 tokens x 151936 would be 8.7 GB of
        # fp32 logits; the chunked op never holds them. Small runs keep the plain path (same numbers as ever).
        import sppo_fast

        return -sppo_fast.linear_logprobs(rows, weight.to(rows.dtype), targets[mask], bias=bias).mean()
    logits = F.linear(rows, weight, bias).float()
    return F.cross_entropy(logits, targets[mask])


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def supervised_fine_tune(cfg, lm, tokenizer, task, device, *, log=print, progress=True):
    """Train `lm` in place on the task's worked solutions."""
    from tqdm import tqdm

    examples = task.examples("train", cfg.sft_examples, seed=cfg.seed + 7919)
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    examples = sft_targets(examples, cfg.sft_direct_fraction, gen)
    order = torch.randperm(len(examples), generator=gen).tolist()
    hidden_model = PolicyHidden(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, int(SFT_WARMUP_FRACTION * cfg.sft_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.sft_steps, warmup))
    lm.train()
    cursor, start = 0, time.time()
    bar = tqdm(range(cfg.sft_steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if cursor + cfg.sft_batch_size > len(order):
            order = torch.randperm(len(examples), generator=gen).tolist()
            cursor = 0
        batch = [examples[i] for i in order[cursor: cursor + cfg.sft_batch_size]]
        cursor += cfg.sft_batch_size
        loss = sft_loss(hidden_model, lm, *sft_batch(tokenizer, batch, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"warm start: {cfg.sft_steps} SFT steps in {time.time() - start:.1f}s, last loss {loss.item():.3f}")
    return loss.item()


def warm_start(cfg, lm, tokenizer, task, device, *, is_main=True, barrier=None, log=print, progress=True):
    """Load the cached warm start, or make it (on the main rank) and cache it. Returns where it lives."""
    path = cache_path(cfg, lm, tokenizer)
    if is_main and not os.path.exists(path):
        log(f"warm start: not cached, fine-tuning ({cfg.sft_steps} steps) -> {path}")
        loss = supervised_fine_tune(cfg, lm, tokenizer, task, device, log=log, progress=progress)
        save_atomic(lm, path, {"final_loss": loss, "key": warm_start_key(cfg, lm, tokenizer)})
    if barrier is not None:
        barrier()
    if not load_cached(lm, path):
        raise RuntimeError(f"warm start: cache file {path} is missing after fine-tuning")
    if is_main:
        log(f"warm start: loaded {path}")
    return path
