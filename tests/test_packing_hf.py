"""The HF model helpers on packed (padding-free) rows (issue 9 part 4): input_ids (1, N) with
position_ids restarting at 0, or cu_seqlens. Log-probs, entropy, the loss and the gradient of every
parameter equal those of each sequence run through `model(...).logits` on its own (fp64 oracle, docs/api.md §5
criterion for the values)."""

import pytest
import torch
import transformers
from spec_helpers import assert_spec_close

import sppo_fast as sf
from sppo_fast.integrations.hf import policy_loss_from_model, token_logprobs_from_model

masking_utils = pytest.importorskip("transformers.masking_utils")
if not hasattr(masking_utils, "find_packed_sequence_indices"):
    pytest.skip(f"transformers {transformers.__version__} does not build packed-sequence masks from position_ids "
                "(the helpers refuse packed rows there)", allow_module_level=True)

V, H = 97, 32
SMALL = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LENGTHS = [5, 1, 7, 3]


def build(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))


def packed_row(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return seqs, torch.cat(seqs).unsqueeze(0), positions


def per_sequence_logprobs(model, seqs, temperature=1.0):
    """Each sequence alone through model(...).logits: log-prob and entropy of token t >= 1 of each
    sequence, 0 at its first token, concatenated into the packed layout (N,)."""
    logps, entropies = [], []
    for seq in seqs:
        logits = model(input_ids=seq.unsqueeze(0)).logits[0, :-1] / temperature
        logp_all = torch.log_softmax(logits.double() if logits.dtype == torch.float64 else logits, -1)
        zero = logits.new_zeros(1)
        logps.append(torch.cat([zero, logp_all.gather(-1, seq[1:].unsqueeze(-1)).squeeze(-1)]))
        entropies.append(torch.cat([zero, -(logp_all.exp() * logp_all).sum(-1)]))
    return torch.cat(logps), torch.cat(entropies)


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied"])
@pytest.mark.parametrize("marker", ["position_ids", "cu_seqlens"])
def test_packed_token_logprobs_equal_each_sequence_alone(kind, marker):
    model = build(kind).eval()
    seqs, input_ids, positions = packed_row()
    cu = sf.cu_seqlens_from_position_ids(positions)
    extra = {"position_ids": positions} if marker == "position_ids" else {"cu_seqlens": cu}
    with torch.no_grad():
        logp, entropy = token_logprobs_from_model(model, input_ids, None, temperature=0.8, return_entropy=True,
                                                  **extra)
        eager = per_sequence_logprobs(model, seqs, 0.8)
        oracle = per_sequence_logprobs(model.double(), seqs, 0.8)
    assert logp.shape == entropy.shape == input_ids.shape
    assert_spec_close(logp[0], eager[0], oracle[0], torch.float32, "logp")
    assert_spec_close(entropy[0], eager[1], oracle[1], torch.float32, "entropy")
    starts = positions[0] == 0
    assert torch.all(logp[0][starts] == 0)


@pytest.mark.parametrize("preset", ["sppo", "gspo", "sspo"])
def test_packed_policy_loss_from_model_matches_eager(preset):
    """Values and the gradient of every parameter against the eager per-sequence log-probs fed to the
    packed policy_loss (whose equality with the padded call tests/test_packing.py shows)."""
    model = build("qwen2-tied")
    seqs, input_ids, positions = packed_row(seed=1)
    N, S = input_ids.shape[1], len(seqs)
    g = torch.Generator().manual_seed(2)
    response_mask = (positions >= 2)  # the first two tokens of each sequence are its prompt
    with torch.no_grad():
        old_logp = per_sequence_logprobs(model, seqs)[0].unsqueeze(0) + 0.2 * torch.randn(1, N, generator=g)
    advantages = torch.randn(S, generator=g)
    segment_ids = sf.segment_ids(input_ids % 4, [0], mask=response_mask)  # "newlines": ids divisible by 4
    config = sf.PolicyLossConfig.preset(preset, **({"clip_low": 0.1, "clip_high": 0.1} if preset == "gspo" else {}))
    cu = sf.cu_seqlens_from_position_ids(positions)
    kwargs = dict(segment_ids=segment_ids if preset == "sspo" else None)

    model.zero_grad()
    out = policy_loss_from_model(model, input_ids, None, position_ids=positions, old_logp=old_logp,
                                 advantages=advantages, response_mask=response_mask, config=config, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logp, entropy = per_sequence_logprobs(model, seqs)
    eager = sf.policy_loss(logp, old_logp[0], advantages, response_mask[0], config, entropy=entropy,
                           cu_seqlens=cu, **kwargs)
    eager.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logp[0][response_mask[0]], logp.detach()[response_mask[0]], rtol=1e-5, atol=1e-5)
    assert out.logp.shape == (1, N)
    named = dict(model.named_parameters())
    assert set(grads) == {n for n, p in named.items() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, named[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_inputs_are_checked():
    model = build("llama")
    seqs, input_ids, positions = packed_row()
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs_from_model(model, input_ids.reshape(2, -1), None, position_ids=positions.reshape(2, -1))
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs_from_model(model, input_ids, torch.zeros_like(input_ids), position_ids=positions)
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_logprobs_from_model(model, input_ids, None, logits_to_keep=3, position_ids=positions)
    with pytest.raises(ValueError, match="position_ids"):
        token_logprobs_from_model(model, input_ids, None, position_ids=positions + 1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        token_logprobs_from_model(model, input_ids, None, cu_seqlens=torch.tensor([0, 3, 2, 16]))
    with pytest.raises(ValueError, match="disagree|different"):
        token_logprobs_from_model(model, input_ids, None, position_ids=positions,
                                  cu_seqlens=torch.tensor([0, 8, 16]))
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss_from_model(model, input_ids, None, position_ids=positions, old_logp=torch.zeros(1, 16),
                               advantages=torch.zeros(4), response_mask=torch.ones(1, 15),
                               config=sf.PolicyLossConfig.preset("sppo"))


def test_a_model_that_attends_across_sequences_is_refused(monkeypatch):
    """Without transformers' packed-sequence detection the decoder would mix sequences: refused."""
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model = build("llama")
    seqs, input_ids, positions = packed_row()
    with pytest.raises(ValueError, match="packed sequences apart"):
        token_logprobs_from_model(model, input_ids, None, position_ids=positions)
