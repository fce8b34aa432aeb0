"""Rollouts: sample responses with the KV cache and lay them out as (B, T) tensors for the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, R) right-padded with pad; the EOS is part of the response
    response_mask: torch.Tensor    # (B, R) 1 on response tokens up to and including EOS
    texts: list[str]               # decoded responses without EOS/padding
    truncated: torch.Tensor        # (B,) bool: no EOS within max_new_tokens
    # (B, R) fp32: log-prob of each response token under the sampling policy at the sampling temperature,
    # from the logits the sampler drew it from (0 past the mask); None unless asked for
    logprobs: torch.Tensor | None = None
    # (B,) fp32 ReMax: the reward of the greedy response to each row's prompt (the baseline); None otherwise.
    # Per step, not per mini-batch: `select` leaves it out.
    baseline_rewards: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def response_slice(self, per_position: torch.Tensor) -> torch.Tensor:
        """Rows of a per-position tensor over `input_ids` that predict the response tokens: position t
        predicts token t + 1, so the response's R tokens come from positions P - 1 .. P + R - 2."""
        p, r = self.prompt_ids.shape[1], self.response_ids.shape[1]
        return per_position[:, p - 1: p - 1 + r]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index`, with the response columns cut to the longest selected response (padding
        columns cost a full forward and backward for nothing)."""
        width = max(1, int(self.response_mask[index].sum(1).max()))
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index, :width],
                       self.response_mask[index, :width], [self.texts[i] for i in index.tolist()],
                       self.truncated[index],
                       None if self.logprobs is None else self.logprobs[index, :width])


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def response_mask_after_eos(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first EOS, and whether a row never reached one."""
    is_eos = response_ids == eos_id
    # Number of EOS seen strictly before each position: 0 means the token is still part of the response.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
             device, autocast=None, logprobs: bool = False) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups). `temperature <= 0` decodes greedily.
    Sampling draws from torch's global generator, which the checkpoints save and restore. `logprobs`: also
    return each sampled token's log-prob at `temperature`, from the logits it was drawn from (no extra
    forward pass; the draws are the same as without it)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    check_positions(model, prompt_ids.shape[1], max_new_tokens)
    sample = temperature > 0
    kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, use_cache=True,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    if logprobs:
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    was_training = model.training
    model.eval()
    with autocast() if autocast else _null():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    model.train(was_training)
    logits = out.logits if logprobs else None
    out = out.sequences if logprobs else out
    response_ids = out[:, prompt_ids.shape[1]:]
    if response_ids.shape[1] == 0:  # max_new_tokens was 0 in effect: keep one pad column
        response_ids = torch.full((len(prompts), 1), tokenizer.pad_token_id, device=device)
    mask, truncated = response_mask_after_eos(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(~mask.bool(), tokenizer.pad_token_id)
    texts = decode_responses(tokenizer, response_ids, mask)
    token_logprobs = None
    if logprobs:
        token_logprobs = sampled_logprobs(logits, response_ids, mask, temperature)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, texts, truncated, token_logprobs)


def generate_greedy_baseline(model, tokenizer, prompts: list[str], *, max_new_tokens: int, device,
                             autocast=None) -> Rollout:
    """ReMax's baseline: one greedy (argmax) response per prompt, decoded with the KV cache by the policy
    that sampled the step's responses, before its update. It draws nothing from the random generator, so the
    sampled responses of this and later steps are the ones they would be without it."""
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, device=device,
                    autocast=autocast)


def sampled_logprobs(step_logits, response_ids, mask, temperature: float) -> torch.Tensor:
    """(B, R) fp32 log-probs of the response tokens from the sampler's raw logits (one (B, V) tensor per
    generated position), at `temperature` (1 when greedy); 0 where the mask is 0."""
    width = response_ids.shape[1]
    if not step_logits:
        return torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    logits = torch.stack(step_logits[:width], dim=1).float()  # (B, R, V)
    if temperature > 0:
        logits = logits / temperature
    picked = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[:, :logits.shape[1], None]).squeeze(-1)
    if picked.shape[1] < width:  # the one pad column of an empty generation
        picked = torch.nn.functional.pad(picked, (0, width - picked.shape[1]))
    return picked.masked_fill(~mask.bool(), 0.0)


def check_positions(model, prompt_len: int, max_new_tokens: int):
    """A response that could run past the model's positions would index past its position table (or
    silently extrapolate RoPE): refuse it up front."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) plus the prompt ({prompt_len} tokens) exceeds the "
                         f"model's max_position_embeddings ({limit}); lower max_new_tokens or raise "
                         "max_positions")


UNKNOWN_ID_TEXT = "\ufffd"  # what a sampled id without a token decodes to


def decode_responses(tokenizer, response_ids, mask) -> list[str]:
    """Texts of the responses. A policy with more output rows than the tokenizer has tokens (`--vocab_size`)
    can sample an id that maps to no token; the tokenizer would drop it silently (so "1<id>2" would read
    "12"), so each such id becomes U+FFFD, which no verifier accepts inside an answer."""
    texts = []
    eos, known = tokenizer.eos_token_id, len(tokenizer)
    for ids, m in zip(response_ids.tolist(), mask.tolist()):
        kept = [t for t, keep in zip(ids, m) if keep and t != eos]
        if all(t < known for t in kept):
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
            continue
        pieces, run = [], []
        for t in kept:
            if t < known:
                run.append(t)
            else:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True) + UNKNOWN_ID_TEXT)
                run = []
        texts.append("".join(pieces) + tokenizer.decode(run, skip_special_tokens=True))
    return texts


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
