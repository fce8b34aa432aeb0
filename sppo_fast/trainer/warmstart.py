"""Warm start: supervised fine-tuning on the task's worked solutions, so that RL starts from a policy
that is sometimes right. The result is cached on disk (safetensors, written atomically) under a key
made of everything that determines it.

A warm start stopped by SIGINT/SIGTERM (`stop`) keeps its progress next to the cache file
(`<key>.partial/`: weights, optimizer, schedule, data order and generator); the next warm start with the
same key continues from there and ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
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
        "version": 2,  # 2: SFT steps in length-grouped micro-batches (same loss, other rounding)
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


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with BOS, target ids + EOS) of each (prompt, target) pair, in one batched call each."""
    if not pairs:
        return []
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    return [(p, t + [tokenizer.eos_token_id]) for p, t in zip(prompts, targets)]


def sft_batch(tokenizer, pairs, device, encoded=None):
    """Left-padded prompt + target + EOS, with a mask over the target tokens and EOS. `encoded`: the pairs
    already through `encode_pairs`."""
    encoded = encode_pairs(tokenizer, pairs) if encoded is None else encoded
    rows = [prompt + target for prompt, target in encoded]
    loss_rows = [[0] * len(prompt) + [1] * len(target) for prompt, target in encoded]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    loss_mask = torch.tensor([[0] * (width - len(r)) + m for r, m in zip(rows, loss_rows)], device=device)
    return ids, attn, loss_mask


# What one more micro-batch costs, in padded tokens' worth of compute (its few hundred small ops of forward
# and backward, and smaller matrix products). On 2 cores (Intel Xeon, default run's batches of 64) a cost of
# 256 gave 2-3 groups, 2035 padded tokens a step instead of 2734, and 6.5 SFT steps/s against 5.6 padded
# to the longest; 32-96 padded less (1903-2009) but ran slower (5.9-6.0 steps/s).
SFT_MICRO_BATCH_COST = 256


def length_groups(lengths: list[int], cost: int = SFT_MICRO_BATCH_COST) -> list[list[int]]:
    """Indices of `lengths` split into groups that each get padded to their own longest row, chosen to
    minimise the padded tokens plus `cost` per group (exactly, by dynamic programming over the sorted
    lengths). Half the default task's targets are a bare answer line (about 20 tokens with the prompt),
    half a worked solution (about 45): one batch padded to the longest wastes a third of its compute."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):  # best[end]: rows order[:end] grouped; the last group is order[start:end]
        width = sorted_lengths[end - 1]
        for start in range(end):
            total = best[start] + (end - start) * width + cost
            if total < best[end]:
                best[end], cut[end] = total, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def sft_micro_batches(tokenizer, pairs, device, encoded=None):
    """The step's examples as a few left-padded batches of similar length (`length_groups`); together they
    are the same examples and the same loss as one batch padded to the longest."""
    encoded = encode_pairs(tokenizer, pairs) if encoded is None else encoded
    groups = length_groups([len(p) + len(t) for p, t in encoded])
    return [sft_batch(tokenizer, None, device, encoded=[encoded[i] for i in group]) for group in groups]


def sft_loss(hidden_model, lm, batches):
    """Mean cross-entropy of the solution tokens over all of `batches` ((ids, attn, loss_mask) each, as
    `sft_micro_batches` makes them): the sum over each batch's tokens divided by the count over all, so
    that it equals the loss of one padded batch; logits only for the positions that predict them."""
    total = sum(int(mask[:, 1:].sum()) for _, _, mask in batches)
    loss = None
    for ids, attn, loss_mask in batches:
        part = _sft_loss_sum(hidden_model, lm, ids, attn, loss_mask) / max(1, total)
        loss = part if loss is None else loss + part
    return loss


def _sft_loss_sum(hidden_model, lm, ids, attn, loss_mask):
    hidden = hidden_model(ids, attn)[:, :-1]
    targets, mask = ids[:, 1:], loss_mask[:, 1:].bool()
    weight, bias = lm_head_of(lm)
    rows = hidden[mask]
    if rows.shape[0] * weight.shape[0] > SFT_DENSE_LOGITS_LIMIT:
        # A real vocabulary (--vocab_size) on long solutions: 64 x 224 tokens x 151936 would be 8.7 GB of
        # fp32 logits; the chunked op never holds them. Small runs keep the plain path.
        import sppo_fast

        return -sppo_fast.linear_logprobs(rows, weight.to(rows.dtype), targets[mask], bias=bias).sum()
    logits = F.linear(rows, weight, bias).float()
    return F.cross_entropy(logits, targets[mask], reduction="sum")


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class WarmStartInterrupted(Exception):
    """The fine-tuning stopped by a signal after `step` of `total` steps, its progress saved."""

    def __init__(self, step: int, total: int, signum: int, partial: str):
        super().__init__(f"warm start interrupted at SFT step {step} of {total}; its progress is kept in {partial}")
        self.step, self.total, self.signum, self.partial = step, total, signum, partial


def partial_path(path: str) -> str:
    """Where an interrupted warm start for the cache file `path` keeps its progress."""
    return path[: -len(".safetensors")] + ".partial" if path.endswith(".safetensors") else path + ".partial"


def save_partial(directory: str, lm, state: dict):
    """Write the progress atomically: a fresh directory renamed over the old one."""
    from safetensors.torch import save_model

    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(lm, os.path.join(tmp, "model.safetensors"))
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_partial(directory: str, lm, device) -> dict | None:
    """The saved progress (weights loaded into `lm`), or None when there is none or it cannot be read."""
    if not os.path.exists(os.path.join(directory, "state.pt")):
        return None
    from safetensors.torch import load_model

    try:
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        load_model(lm, os.path.join(directory, "model.safetensors"), device=str(device))
    except Exception:  # noqa: BLE001 - unreadable progress: the warm start starts over (same result)
        return None
    return state


def supervised_fine_tune(cfg, lm, tokenizer, task, device, *, log=print, progress=True, stop=None,
                         partial=None):
    """Train `lm` in place on the task's worked solutions. With `partial` (a directory), continue from the
    progress saved there, and when `stop` becomes true (a signal) save the progress there and raise
    WarmStartInterrupted."""
    from tqdm import tqdm

    examples = task.examples("train", cfg.sft_examples, seed=cfg.seed + 7919)
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    examples = sft_targets(examples, cfg.sft_direct_fraction, gen)
    encoded = encode_pairs(tokenizer, examples)  # once, not at every step (each is used about 5 times)
    order = torch.randperm(len(examples), generator=gen).tolist()
    hidden_model = PolicyHidden(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, int(SFT_WARMUP_FRACTION * cfg.sft_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.sft_steps, warmup))
    cursor, first, last_loss = 0, 0, float("nan")
    saved = load_partial(partial, lm, device) if partial else None
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        order, cursor, first = saved["order"].tolist(), int(saved["cursor"]), int(saved["step"])
        last_loss = float(saved["loss"])
        log(f"warm start: continuing the interrupted fine-tuning at step {first} of {cfg.sft_steps}")
    lm.train()
    start = time.time()
    bar = tqdm(range(first, cfg.sft_steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True,
               initial=first, total=cfg.sft_steps)
    for step in bar:
        if cursor + cfg.sft_batch_size > len(order):
            order = torch.randperm(len(examples), generator=gen).tolist()
            cursor = 0
        batch = [encoded[i] for i in order[cursor: cursor + cfg.sft_batch_size]]
        cursor += cfg.sft_batch_size
        loss = sft_loss(hidden_model, lm, sft_micro_batches(tokenizer, None, device, encoded=batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        last_loss = loss.item()
        bar.set_postfix(loss=f"{last_loss:.3f}")
        if stop and step + 1 < cfg.sft_steps and partial:
            bar.close()
            save_partial(partial, lm, {
                "step": step + 1, "cursor": cursor, "order": torch.tensor(order, dtype=torch.int64),
                "generator": gen.get_state(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loss": last_loss})
            raise WarmStartInterrupted(step + 1, cfg.sft_steps, stop.signum, partial)
    log(f"warm start: {cfg.sft_steps - first} SFT steps in {time.time() - start:.1f}s, last loss {last_loss:.3f}")
    return last_loss


def warm_start(cfg, lm, tokenizer, task, device, *, is_main=True, barrier=None, log=print, progress=True,
               stop=None):
    """Load the cached warm start, or make it (on the main rank) and cache it. Returns where it lives.
    `stop` (a signals.StopRequest): see `supervised_fine_tune`."""
    path = cache_path(cfg, lm, tokenizer)
    if is_main and not os.path.exists(path):
        log(f"warm start: not cached, fine-tuning ({cfg.sft_steps} steps) -> {path}")
        partial = partial_path(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        loss = supervised_fine_tune(cfg, lm, tokenizer, task, device, log=log, progress=progress, stop=stop,
                                    partial=partial)
        save_atomic(lm, path, {"final_loss": loss, "key": warm_start_key(cfg, lm, tokenizer)})
        shutil.rmtree(partial, ignore_errors=True)
    if barrier is not None:
        barrier()
    if not load_cached(lm, path):
        raise RuntimeError(f"warm start: cache file {path} is missing after fine-tuning")
    if is_main:
        log(f"warm start: loaded {path}")
    return path
