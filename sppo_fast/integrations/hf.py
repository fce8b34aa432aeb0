"""Log-probs and the policy loss of any `transformers` causal LM, from the decoder's last hidden states
and the output embedding, never holding the (B, T, V) logits.

Positions follow TRL: for `input_ids` (B, L) and `logits_to_keep = K`, the results are those of the
last K tokens `input_ids[:, -K:]`, each predicted from the hidden state one position earlier
(`[:, -K-1:-1]`). The decoder body runs (`model.get_decoder()`), never the model's own head, and
`sppo_fast.linear_logprobs` / `fused_linear_policy_loss` apply the output embedding's weight and bias
chunk by chunk. Gradients reach every parameter the model's own logits depend on, a tied embedding
once per use, exactly as autograd through `model(...).logits` would.

What the model does to its logits after the head must be reproduced exactly or refused:
- Cohere's `logit_scale` (logits * s) and Granite's `logits_scaling` (logits / s) are plain scalings,
  folded into the temperature: softmax(s * z / T) = softmax(z / (T / s));
- Gemma-2/3's `final_logit_softcapping` (cap * tanh(z / cap)) is not linear in the hidden states: a
  ValueError names the model type and the field;
- anything else: before its first use a model is probed once (one eval-mode, no-grad forward of at
  most 16 tokens of the first row): its own logits must equal the output embedding applied to the
  decoder's last hidden state, times the folded scale, or a ValueError says they differ.

Wrappers: PEFT models are unwrapped with `get_base_model()` (their LoRA layers stay active; LoRA on the
output embedding itself is refused, since its weight would not be the effective one); DDP runs the
computation inside its own forward, so its reducer prepares for the backward and the gradients are
all-reduced as after `ddp(...)`; FSDP2 works when the output embedding is not sharded (shard the
decoder and its layers, as `sppo-fast train` does); an output embedding that FSDP2 manages is refused.

Tensor parallel: an `lm_head` split by vocabulary with
`parallelize_module(model, mesh, {"lm_head": ColwiseParallel(...)})` (its weight a DTensor sharded on dim
0) goes to the fused ops as it is: they read the split from the DTensor, combine the ranks' columns, and
return the whole vocabulary's log-probs, entropy and loss on every rank; the hidden states (replicated
over the mesh: the decoder is not split, or hands back a DTensor that is made replicated here) get their
whole gradient, lm_head's weight the gradient of its shard."""

import math
import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from .._checks import check_integer, check_temperature, check_tensor
from ..api import fused_linear_policy_loss, linear_logprobs
from ..layout import check_cu_seqlens, cu_seqlens_from_position_ids
from ..losses import PolicyLossConfig

PROBE_TOKENS = 16
_VERIFIED = weakref.WeakKeyDictionary()  # causal LM -> the logit scale its probe confirmed


def token_logprobs_from_model(model, input_ids, attention_mask, *, logits_to_keep=None, temperature=1.0,
                              return_entropy=False, chunk_size=None, position_ids=None, cu_seqlens=None):
    """Log-probs (and entropies) fp32 (B, K) of `input_ids[:, -K:]` under `model` at `temperature`, for
    old/reference log-probs and evaluation. Positions whose `attention_mask` is 0 get 0.
    A packed row (`input_ids` (1, N), `attention_mask` None, `position_ids` restarting at 0 or
    `cu_seqlens`, no `logits_to_keep`) gives (1, N): every token's log-prob within its own sequence,
    0 at each sequence's first token."""
    temperature = check_temperature(temperature)
    model_parts = resolve_model(model)
    if position_ids is not None or cu_seqlens is not None:
        return _packed_token_logprobs(model_parts, input_ids, attention_mask, position_ids, cu_seqlens,
                                      logits_to_keep, temperature, return_entropy, chunk_size)
    _require_logits_to_keep(logits_to_keep)
    targets = _check_inputs(model_parts, input_ids, attention_mask, logits_to_keep)
    targets = targets.masked_fill(attention_mask[:, -logits_to_keep:] == 0, -100)

    def compute():
        hidden, weight, bias = _head_inputs(_completion_hidden(model_parts, input_ids, attention_mask, logits_to_keep),
                                            model_parts.head)
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / model_parts.scale,
                               return_entropy=return_entropy, chunk_size=chunk_size)

    return model_parts.run(compute)


def policy_loss_from_model(model, input_ids, attention_mask, *, logits_to_keep=None, old_logp, advantages,
                           response_mask, config, ref_logp=None, segment_ids=None, temperature=1.0,
                           normalizer=None, rollout_is_weights=None, position_ids=None, cu_seqlens=None):
    """`sppo_fast.fused_linear_policy_loss` on the last K = `logits_to_keep` tokens of `input_ids`:
    `old_logp`, `response_mask`, `ref_logp`, `segment_ids` are (B, K), `advantages` (B,) or (B, K).
    Returns PolicyLossOutput; `loss.backward()` reaches every parameter of the model.
    A packed row (see token_logprobs_from_model): the per-token tensors are (1, N), `advantages` (S,) or
    (1, N); `response_mask` selects the completion tokens (a sequence's first token never counts)."""
    temperature = check_temperature(temperature)
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    model_parts = resolve_model(model)
    if position_ids is not None or cu_seqlens is not None:
        return _packed_policy_loss(model_parts, input_ids, attention_mask, position_ids, cu_seqlens, logits_to_keep,
                                   old_logp, advantages, response_mask, config, ref_logp, segment_ids, temperature,
                                   normalizer, rollout_is_weights)
    _require_logits_to_keep(logits_to_keep)
    targets = _check_inputs(model_parts, input_ids, attention_mask, logits_to_keep)
    check_tensor("response_mask", response_mask)
    if tuple(response_mask.shape) != tuple(targets.shape):
        raise ValueError(f"response_mask must have shape {tuple(targets.shape)} (B, logits_to_keep), "
                         f"got {tuple(response_mask.shape)}")

    def compute():
        hidden, weight, bias = _head_inputs(_completion_hidden(model_parts, input_ids, attention_mask, logits_to_keep),
                                            model_parts.head)
        return fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, response_mask, config,
                                        bias=bias, segment_ids=segment_ids, ref_logp=ref_logp,
                                        temperature=temperature / model_parts.scale, normalizer=normalizer,
                                        rollout_is_weights=rollout_is_weights)

    return model_parts.run(compute)


# ----------------------------------------------------------------------------------------------------
# The model: wrappers, decoder, output embedding, logit post-processing


class ModelParts:
    """The pieces of a (possibly wrapped) causal LM that the fused path needs."""

    def __init__(self, wrapper, causal_lm, decoder, head, scale):
        self.wrapper, self.causal_lm, self.decoder, self.head, self.scale = wrapper, causal_lm, decoder, head, scale

    def run(self, compute):
        """compute() directly, or inside the DDP wrapper's forward (see _through_ddp)."""
        return compute() if self.wrapper is None else _through_ddp(self.wrapper, compute)


def resolve_model(model):
    """ModelParts of `model`: a transformers causal LM, bare or wrapped by PEFT and/or DDP."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    wrapper = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    causal_lm = model.module if wrapper is not None else model
    if callable(getattr(causal_lm, "get_base_model", None)):  # PEFT: the model with its adapters injected
        causal_lm = causal_lm.get_base_model()
    head = causal_lm.get_output_embeddings() if callable(getattr(causal_lm, "get_output_embeddings", None)) else None
    if head is None:
        raise ValueError(f"model ({type(causal_lm).__name__}) has no output embedding "
                         "(get_output_embeddings() is None): pass the causal LM (...ForCausalLM), not its base model")
    _check_head(head, causal_lm)
    decoder = _decoder(causal_lm)
    return ModelParts(wrapper, causal_lm, decoder, head, _logit_scale(causal_lm))


def _check_head(head, causal_lm):
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model's output embedding is a {type(head).__name__}, not a torch.nn.Linear: a LoRA "
                         "adapter or other wrapper on lm_head changes its effective weight, which the fused path "
                         "cannot read; leave lm_head out of the adapter's target_modules")
    weight = head.weight
    if isinstance(weight, DTensor) and not _fsdp_managed(head, causal_lm):
        return  # tensor parallel (ColwiseParallel): the fused ops take the vocabulary split from the DTensor
    if type(weight.data) is not torch.Tensor:
        raise ValueError(f"model's output embedding weight is a {type(weight.data).__name__} (sharded, e.g. by "
                         "FSDP2): shard the decoder and its layers but leave lm_head unsharded, as sppo-fast train "
                         f"does ({type(causal_lm).__name__}); a vocabulary split by tensor parallelism "
                         "(ColwiseParallel on lm_head, without FSDP on it) is taken as it is")


def _fsdp_managed(head, causal_lm):
    """Whether FSDP2 shards the head's weight: fully_shard on the head or on a module above it (the nearest
    one manages every parameter below it that no nested fully_shard took)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    name = next((n for n, m in causal_lm.named_modules() if m is head), None)
    if name is None:
        return isinstance(head, FSDPModule)
    parts = name.split(".") if name else []
    chain = [causal_lm] + [causal_lm.get_submodule(".".join(parts[:i + 1])) for i in range(len(parts))]
    return any(isinstance(m, FSDPModule) for m in chain)


def _decoder(causal_lm):
    """The base model that returns last_hidden_state (final norm included)."""
    decoder = causal_lm.get_decoder() if callable(getattr(causal_lm, "get_decoder", None)) else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, "base_model", None)
    if decoder is None or decoder is causal_lm:
        raise ValueError(f"model ({type(causal_lm).__name__}) has no decoder body (get_decoder() / base_model)")
    return decoder


def _model_type(causal_lm):
    return getattr(getattr(causal_lm, "config", None), "model_type", type(causal_lm).__name__)


def _logit_scale(causal_lm):
    """The factor the model multiplies its head's output by, refusing what is not a plain scaling."""
    config = getattr(causal_lm, "config", None)
    if config is None:
        return 1.0
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for cfg in (config, text):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            raise ValueError(
                f"model type {_model_type(causal_lm)!r} soft-caps its logits (config.final_logit_softcapping={cap}): "
                "cap * tanh(logits / cap) is not linear in the hidden states, so the fused linear path cannot "
                "reproduce it; use model(...).logits with sppo_fast.fused_policy_loss instead")
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(text.logits_scaling)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"model type {_model_type(causal_lm)!r} scales its logits by {scale}: only a finite "
                         "positive scale folds into the temperature")
    return scale


def verify_logits(model_parts, input_ids):
    """Once per model: its own logits must be the output embedding of the decoder's last hidden state
    times the folded scale, so that no post-processing unknown here goes unnoticed."""
    causal_lm = model_parts.causal_lm
    if _VERIFIED.get(causal_lm) == model_parts.scale:
        return
    probe = input_ids[:1, -PROBE_TOKENS:]
    seen = {}
    handle = model_parts.head.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], z=out))
    was_training = causal_lm.training
    try:
        causal_lm.eval()  # no dropout: the two forwards must see the same network
        with torch.no_grad():
            logits = causal_lm(input_ids=probe, use_cache=False).logits
            hidden = _last_hidden(model_parts.decoder(input_ids=probe, use_cache=False))
    finally:
        handle.remove()
        causal_lm.train(was_training)
    what = f"model type {_model_type(causal_lm)!r}"
    seen = {k: _local(v) for k, v in seen.items()}  # tensor parallel: each rank checks its own columns
    logits, hidden = _local(logits), _local(hidden)
    if "h" not in seen or not _close(seen["h"], hidden):
        raise ValueError(f"{what}: its output embedding does not read the decoder's last hidden state unchanged "
                         "(a rescaling or other step in between); the fused path would compute other log-probs")
    expected = seen["z"].double() * model_parts.scale
    if not _close(logits, expected):
        raise ValueError(f"{what}: its logits are post-processed after the output embedding in a way the fused "
                         "path does not reproduce (not a known scaling); it would compute other log-probs")
    _VERIFIED[causal_lm] = model_parts.scale


def _close(x, reference):
    """Equal up to the rounding of two matmuls at x's dtype, relative to the largest entry."""
    if x.shape != reference.shape:
        return False
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    x, reference = x.double(), reference.double()
    return bool(((x - reference).abs() <= tol * (1 + reference.abs().amax())).all())


def _last_hidden(output):
    return _replicated(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])


def _local(x):
    """A DTensor's local tensor (a probe's hook sees what the tensor-parallel hooks hand over)."""
    return x.to_local() if isinstance(x, DTensor) else x


def _replicated(hidden):
    """The hidden states as a plain tensor holding the whole of them, as the vocabulary-parallel ops take
    them: a DTensor (a decoder split by tensor or sequence parallelism) is made replicated, differentiably
    (each rank then gets the whole gradient back, as the ops sum it over the group)."""
    if not isinstance(hidden, DTensor):
        return hidden
    if any(not p.is_replicate() for p in hidden.placements):
        hidden = hidden.redistribute(hidden.device_mesh, [Replicate()] * hidden.device_mesh.ndim)
    return hidden.to_local()


# ----------------------------------------------------------------------------------------------------
# Inputs, positions, and the DDP forward


def _check_inputs(model_parts, input_ids, attention_mask, logits_to_keep):
    """Checks before any forward runs; returns the targets input_ids[:, -K:]."""
    check_integer("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
    check_tensor("attention_mask", attention_mask)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    length = input_ids.shape[1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(f"logits_to_keep must be an int, got {type(logits_to_keep).__name__}")
    if not 1 <= logits_to_keep < length:
        raise ValueError(f"logits_to_keep must be in [1, L - 1] = [1, {length - 1}] (each kept token is predicted "
                         f"from the position before it), got {logits_to_keep}")
    device = model_parts.head.weight.device
    for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the model is on {device}")
    verify_logits(model_parts, input_ids)
    return input_ids[:, -logits_to_keep:]


def position_ids_from_mask(attention_mask):
    """Positions counted over the attended tokens, as transformers' generate() makes them for left
    padding (padding gets 1, masked out anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _completion_hidden(model_parts, input_ids, attention_mask, logits_to_keep):
    """The decoder's last hidden states at the positions that predict input_ids[:, -K:]: (B, K, H)."""
    out = model_parts.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return _last_hidden(out)[:, -logits_to_keep - 1:-1]


def _head_inputs(hidden, head):
    """(hidden, weight, bias) as the model's own lm_head would multiply them: under autocast (fp32
    weights, bf16 compute, as accelerate's mixed precision runs) all three at the autocast dtype, the
    casts differentiable so the fp32 weight gets its gradient. The custom ops are not autocast-aware."""
    hidden = _replicated(hidden)
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, head.weight, head.bias
    dtype = torch.get_autocast_dtype(device_type)
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def _through_ddp(ddp, compute):
    """Run compute() as the DDP module's forward: DDP's own __call__ then prepares its reducer for the
    backward (without that, the gradient hooks do not all-reduce) and honours no_sync()."""
    inner = ddp.module
    patched = inner.__dict__.get("forward")  # accelerate and TRL patch forward onto the instance: keep theirs
    inner.forward = lambda *args, **kwargs: compute()  # an instance attribute shadows the class's forward
    try:
        return ddp()
    finally:
        if patched is None:
            del inner.forward
        else:
            inner.forward = patched


def _require_logits_to_keep(logits_to_keep):
    if logits_to_keep is None:
        raise ValueError("logits_to_keep is required (the number of completion tokens at the end of input_ids), "
                         "unless the batch is a packed row given with position_ids= or cu_seqlens=")


# ----------------------------------------------------------------------------------------------------
# Packed (padding-free) rows: input_ids (1, N), sequences marked by position_ids restarting at 0 or by
# cu_seqlens. Every token n of the row gets the log-prob of input_ids[n] predicted from position n - 1
# of its own sequence; the first token of each sequence has no prediction (0, never in the loss).


def _packed_layout(model_parts, input_ids, attention_mask, position_ids, cu_seqlens, logits_to_keep):
    """(position_ids (1, N), cu_seqlens, starts (N,) bool) of a packed row, checked before any forward."""
    check_integer("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"packed input_ids must have shape (1, N) (one row of concatenated sequences), "
                         f"got {tuple(input_ids.shape)}")
    if logits_to_keep is not None:
        raise ValueError("logits_to_keep must be None for a packed row: every token gets its log-prob; select "
                         "the completion tokens with response_mask")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask)
        if tuple(attention_mask.shape) != tuple(input_ids.shape) or not bool((attention_mask != 0).all()):
            raise ValueError("attention_mask must be None or all ones for a packed row (a padding-free batch has "
                             "no padding; the sequences are told apart by position_ids / cu_seqlens)")
    n, device = input_ids.shape[1], input_ids.device
    if position_ids is not None:
        check_integer("position_ids", position_ids)
        if tuple(position_ids.shape) not in ((1, n), (n,)):
            raise ValueError(f"position_ids must have shape (1, {n}) like input_ids, got {tuple(position_ids.shape)}")
        from_positions = cu_seqlens_from_position_ids(position_ids)
        if cu_seqlens is not None and check_cu_seqlens(cu_seqlens, n, device) != from_positions.tolist():
            raise ValueError("cu_seqlens and position_ids describe different sequences; pass one of them")
        cu_seqlens = from_positions if cu_seqlens is None else cu_seqlens
        positions = position_ids.reshape(1, n).to(torch.long)
    else:
        cu = check_cu_seqlens(cu_seqlens, n, device)
        starts = torch.tensor(cu[:-1], dtype=torch.long, device=device)
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.long, device=device)
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), lengths, output_size=n)
        positions = (torch.arange(n, device=device) - starts[seq]).unsqueeze(0)
    if model_parts.head.weight.device != device:
        raise ValueError(f"input_ids is on {device} but the model is on {model_parts.head.weight.device}")
    verify_logits(model_parts, input_ids)
    verify_packed_attention(model_parts, input_ids)
    return positions, cu_seqlens, positions[0] == 0


_PACKED_VERIFIED = weakref.WeakSet()  # causal LMs whose decoder keeps packed sequences apart


def verify_packed_attention(model_parts, input_ids):
    """Once per model: a packed row of two sequences must give the second one the hidden states it gets
    alone. transformers builds the block-diagonal mask from position_ids (flash-attention reads them
    directly); a model or version that does not would let tokens attend across sequences, silently."""
    causal_lm = model_parts.causal_lm
    tokens = input_ids[0, :PROBE_TOKENS]
    if causal_lm in _PACKED_VERIFIED or tokens.numel() < 2:
        return
    k = tokens.numel() // 2
    positions = torch.cat([torch.arange(k), torch.arange(tokens.numel() - k)]).to(tokens.device).unsqueeze(0)
    was_training = causal_lm.training
    try:
        causal_lm.eval()
        with torch.no_grad():
            packed = _last_hidden(model_parts.decoder(input_ids=tokens.unsqueeze(0), position_ids=positions,
                                                      use_cache=False))[0, k:]
            alone = _last_hidden(model_parts.decoder(input_ids=tokens[k:].unsqueeze(0), position_ids=positions[:, k:],
                                                     use_cache=False))[0]
    finally:
        causal_lm.train(was_training)
    if not _close(packed, alone):
        raise ValueError(f"model type {_model_type(causal_lm)!r} does not keep packed sequences apart: given "
                         "position_ids that restart at 0 (and no attention_mask) its tokens attend across sequence "
                         "boundaries (needs transformers >= 4.56 masks or flash-attention); use padded batches")
    _PACKED_VERIFIED.add(causal_lm)


def _packed_hidden(model_parts, input_ids, positions):
    """(N, H): row n is the decoder's last hidden state at n - 1, the one that predicts input_ids[n] (row 0,
    a sequence start, repeats row 0 and is never used). The decoder sees position_ids and no attention
    mask, from which transformers builds the block-diagonal causal mask of packed sequences."""
    out = model_parts.decoder(input_ids=input_ids, position_ids=positions, use_cache=False)
    hidden = _last_hidden(out)[0]
    previous = (torch.arange(hidden.shape[0], device=hidden.device) - 1).clamp(min=0)
    return hidden.index_select(0, previous)


def _packed_token_logprobs(model_parts, input_ids, attention_mask, position_ids, cu_seqlens, logits_to_keep,
                           temperature, return_entropy, chunk_size):
    positions, _, starts = _packed_layout(model_parts, input_ids, attention_mask, position_ids, cu_seqlens,
                                          logits_to_keep)
    targets = input_ids[0].masked_fill(starts, -100)

    def compute():
        hidden, weight, bias = _head_inputs(_packed_hidden(model_parts, input_ids, positions), model_parts.head)
        out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / model_parts.scale,
                              return_entropy=return_entropy, chunk_size=chunk_size)
        return tuple(x.unsqueeze(0) for x in out) if return_entropy else out.unsqueeze(0)

    return model_parts.run(compute)


def _packed_policy_loss(model_parts, input_ids, attention_mask, position_ids, cu_seqlens, logits_to_keep,
                        old_logp, advantages, response_mask, config, ref_logp, segment_ids, temperature, normalizer,
                        rollout_is_weights):
    positions, cu_seqlens, starts = _packed_layout(model_parts, input_ids, attention_mask, position_ids,
                                                   cu_seqlens, logits_to_keep)
    check_tensor("response_mask", response_mask)
    n = input_ids.shape[1]
    if tuple(response_mask.shape) not in ((1, n), (n,)):
        raise ValueError(f"response_mask must have shape (1, {n}) like input_ids, got {tuple(response_mask.shape)}")
    mask = response_mask.reshape(n).bool() & ~starts  # a sequence's first token has no prediction
    targets = input_ids[0].masked_fill(starts, -100)

    def compute():
        hidden, weight, bias = _head_inputs(_packed_hidden(model_parts, input_ids, positions), model_parts.head)
        out = fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, bias=bias,
                                       segment_ids=segment_ids,
                                       ref_logp=ref_logp, temperature=temperature / model_parts.scale,
                                       normalizer=normalizer, rollout_is_weights=rollout_is_weights,
                                       cu_seqlens=cu_seqlens)
        return out._replace(logp=out.logp.unsqueeze(0), entropy=out.entropy.unsqueeze(0))

    return model_parts.run(compute)
