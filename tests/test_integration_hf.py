"""sppo_fast.integrations.hf on tiny transformers models built from configs: log-probs and the policy
loss from the decoder's hidden states against `model(...).logits` + eager log-softmax (fp64 oracle,
docs/api.md §5 criterion), values and the gradient of every parameter; tied embeddings, an lm_head bias,
Cohere/Granite scalings, Gemma-2 soft-capping refused, PEFT/LoRA, DDP and FSDP2 on one gloo process,
left padding, bad input."""

import copy
import os
import tempfile

import pytest
import torch
import transformers
from spec_helpers import assert_spec_close
from torch import nn

import sppo_fast as sf
from sppo_fast import reference
from sppo_fast.integrations.hf import (
    policy_loss_from_model,
    position_ids_from_mask,
    token_logprobs_from_model,
)

V, H, B, L, K = 97, 32, 3, 12, 6
SMALL = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def build(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    if kind == "qwen2-tied":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))
    if kind == "llama-bias":  # an lm_head with a bias (as Phi and GPT-J have)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
        model.lm_head = nn.Linear(H, V, bias=True)
        nn.init.normal_(model.lm_head.bias, std=0.5)
        return model
    if kind == "gpt2-tied":  # absolute positions: left padding must use positions from the mask
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=1, n_head=4,
                                                                    n_positions=64, resid_pdrop=0.0,
                                                                    embd_pdrop=0.0, attn_pdrop=0.0,
                                                                    bos_token_id=0, eos_token_id=0))
    if kind == "cohere":  # logits * logit_scale
        return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=3.0))
    if kind == "granite":  # logits / logits_scaling
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=0.4))
    if kind == "gemma2-uncapped":  # refused only for the soft-capping of its logits
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=8,
                                                                         final_logit_softcapping=None))
    raise KeyError(kind)


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, -2:] = 0  # a completion right-padded
    response_mask = attention_mask[:, -K:].float()
    advantages = torch.randn(B, generator=gen)
    old_logp = -torch.rand(B, K, generator=gen) * 5
    ref_logp = old_logp + 0.1 * torch.randn(B, K, generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                advantages=advantages, old_logp=old_logp, ref_logp=ref_logp)


def model_logits(model, batch):
    """What the user's own model returns at the positions predicting input_ids[:, -K:]."""
    mask = batch["attention_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False)
    return out.logits[:, -K - 1:-1]


def reference_loss(model, batch, config, temperature):
    logits = model_logits(model, batch)
    return reference.fused_policy_loss(logits, batch["input_ids"][:, -K:], batch["old_logp"], batch["advantages"],
                                       batch["response_mask"], config, ref_logp=batch["ref_logp"],
                                       temperature=temperature)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_loss_and_every_gradient(kind_or_model, config, temperature=0.7, seed=0):
    """Ours on the fp32 model against the fp64 model's own logits; eager fp32 sets the error budget."""
    model = build(kind_or_model) if isinstance(kind_or_model, str) else kind_or_model
    oracle_model, eager_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    batch = make_inputs(seed)
    ours = policy_loss_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                  old_logp=batch["old_logp"], advantages=batch["advantages"],
                                  response_mask=batch["response_mask"], config=config, ref_logp=batch["ref_logp"],
                                  temperature=temperature)
    ours.loss.backward()
    oracle = reference_loss(oracle_model, batch, config, temperature)
    oracle.loss.backward()
    eager = reference_loss(eager_model, batch, config, temperature)
    eager.loss.backward()
    assert_spec_close(ours.loss, eager.loss, oracle.loss, torch.float32, "loss")
    on = batch["response_mask"].bool()
    assert_spec_close(ours.logp[on], eager.logp[on], oracle.logp[on], torch.float32, "logp")
    g_ours, g_oracle, g_eager = grads(model), grads(oracle_model), grads(eager_model)
    assert set(g_ours) == set(g_oracle) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in g_oracle:
        assert_spec_close(g_ours[name], g_eager[name], g_oracle[name], torch.float32, name)
    return model, ours


@pytest.mark.parametrize("kind", ["qwen2", "llama-bias", "gpt2-tied", "cohere", "granite"])
def test_policy_loss_from_model_every_parameter_against_fp64(kind):
    config = sf.PolicyLossConfig.preset("dapo", kl_coef=0.05, entropy_coef=0.01)
    check_loss_and_every_gradient(kind, config)


def test_policy_loss_from_model_on_every_backend(backend):
    check_loss_and_every_gradient("llama", sf.PolicyLossConfig.preset("gspo", kl_coef=0.05), seed=1)


def test_tied_embedding_is_one_parameter_with_both_uses_in_its_gradient():
    model, _ = check_loss_and_every_gradient("qwen2-tied", sf.PolicyLossConfig.preset("grpo"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # compared above as the embedding's gradient


@pytest.mark.parametrize("kind", ["llama-bias", "gpt2-tied", "cohere", "granite", "gemma2-uncapped"])
def test_token_logprobs_from_model_against_model_logits(kind):
    model = build(kind).double()
    batch = make_inputs(2)
    if kind == "gemma2-uncapped":  # transformers' Gemma-2 attention turns left padding into NaN in fp64
        batch["attention_mask"][1] = 1
    logp, entropy = token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                              temperature=0.9, return_entropy=True)
    expected_logp, expected_entropy = reference.token_logprobs(model_logits(model, batch), batch["input_ids"][:, -K:],
                                                               temperature=0.9, return_entropy=True)
    off = batch["attention_mask"][:, -K:] == 0
    torch.testing.assert_close(logp, expected_logp.masked_fill(off, 0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(entropy, expected_entropy.masked_fill(off, 0), rtol=1e-10, atol=1e-10)


def test_token_logprobs_from_model_fp32_kernels_against_fp64():
    model = build("qwen2-tied")
    batch = make_inputs(3)
    args = (batch["input_ids"], batch["attention_mask"])
    ours = token_logprobs_from_model(model, *args, logits_to_keep=K, return_entropy=True, chunk_size=4)
    oracle = reference.token_logprobs(model_logits(copy.deepcopy(model).double(), batch), batch["input_ids"][:, -K:],
                                      return_entropy=True)
    eager = reference.token_logprobs(model_logits(model, batch), batch["input_ids"][:, -K:], return_entropy=True)
    on = batch["attention_mask"][:, -K:].bool()
    for o, e, r, name in zip(ours, eager, oracle, ["logp", "entropy"]):
        assert_spec_close(o[on], e[on], r[on], torch.float32, name)


def test_autocast_bf16_like_the_model_under_autocast():
    """accelerate's mixed precision: fp32 weights, bf16 compute. The head then runs at bf16 like the
    model's own lm_head, and the fp32 weights get their gradients."""
    model = build("qwen2-tied")
    batch = make_inputs(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = policy_loss_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                     old_logp=batch["old_logp"], advantages=batch["advantages"],
                                     response_mask=batch["response_mask"], config=sf.PolicyLossConfig.preset("grpo"))
        eager = reference_loss(copy.deepcopy(model), batch, sf.PolicyLossConfig.preset("grpo"), 1.0)
    out.loss.backward()
    oracle = reference_loss(copy.deepcopy(model).double(), batch, sf.PolicyLossConfig.preset("grpo"), 1.0)
    assert_spec_close(out.loss, eager.loss, oracle.loss, torch.bfloat16, "loss")
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_left_padding_changes_nothing():
    """A left-padded row gives what the same tokens give unpadded (GPT-2: absolute positions)."""
    model = build("gpt2-tied").double()
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    alone = token_logprobs_from_model(model, ids, torch.ones_like(ids), logits_to_keep=4)
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    padded = token_logprobs_from_model(model, padded_ids, padded_mask, logits_to_keep=4)
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# Post-processed logits: folded exactly, or refused


def test_gemma2_soft_capping_is_refused():
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=8))
    batch = make_inputs()
    with pytest.raises(ValueError, match=r"'gemma2'.*final_logit_softcapping=30\.0"):
        token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)


def test_gemma3_soft_capping_is_refused():
    config = transformers.Gemma3TextConfig(**SMALL, head_dim=8, final_logit_softcapping=25.0)
    model = transformers.Gemma3ForCausalLM(config)
    batch = make_inputs()
    with pytest.raises(ValueError, match=r"'gemma3_text'.*final_logit_softcapping=25\.0"):
        policy_loss_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                               old_logp=batch["old_logp"], advantages=batch["advantages"],
                               response_mask=batch["response_mask"], config=sf.PolicyLossConfig.preset("grpo"))


class DoubledLogits(transformers.LlamaForCausalLM):
    """A post-processing no config field announces: the probe must catch it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


class ScaledHidden(transformers.LlamaForCausalLM):
    """The head reads a rescaled hidden state (as MiniCPM does): not the decoder's output."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))


@pytest.mark.parametrize("cls,match", [(DoubledLogits, "post-processed"), (ScaledHidden, "does not read")])
def test_unknown_post_processing_is_refused(cls, match):
    model = cls(transformers.LlamaConfig(**SMALL))
    batch = make_inputs()
    with pytest.raises(ValueError, match=match):
        token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)


# ----------------------------------------------------------------------------------------------------
# PEFT


def test_peft_lora_model_every_parameter_against_fp64():
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 lora_dropout=0.0, init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    check_loss_and_every_gradient(model, sf.PolicyLossConfig.preset("grpo"))


def test_peft_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    batch = make_inputs()
    with pytest.raises(ValueError, match="LoRA adapter or other wrapper on lm_head"):
        token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)


# ----------------------------------------------------------------------------------------------------
# DDP and FSDP2 on one gloo process


@pytest.fixture(scope="module")
def process_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _ddp_run(ddp, batch, config, through_wrapper=True):
    calls = []

    def counting_hook(state, bucket):  # DDP calls it once per bucket it all-reduces
        calls.append(bucket.index())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, counting_hook)
    target = ddp if through_wrapper else ddp.module
    out = policy_loss_from_model(target, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                 old_logp=batch["old_logp"], advantages=batch["advantages"],
                                 response_mask=batch["response_mask"], config=config)
    out.loss.backward()
    return out, calls


@pytest.mark.parametrize("through_wrapper", [True, False], ids=["ddp", "bypassing-ddp"])
def test_ddp_forward_runs_through_the_wrapper(process_group, through_wrapper):
    """Through the wrapper the reducer all-reduces every gradient (its comm hook runs); called on the
    inner module (the control) it does not, which is why the helper goes through DDP's forward."""
    config = sf.PolicyLossConfig.preset("dapo")
    plain = build("qwen2-tied")
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    batch = make_inputs(5)
    out, calls = _ddp_run(ddp, batch, config, through_wrapper)
    expected = policy_loss_from_model(plain, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                      old_logp=batch["old_logp"], advantages=batch["advantages"],
                                      response_mask=batch["response_mask"], config=config)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    g_ddp, g_plain = grads(ddp.module), grads(plain)
    assert set(g_ddp) == set(g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_ddp[name], g_plain[name], msg=name)
    assert bool(calls) == through_wrapper


def test_ddp_keeps_a_forward_patched_onto_the_instance(process_group):
    """accelerate and TRL set model.forward on the instance; the DDP detour must put theirs back."""
    model = build("llama")
    own = model.forward
    model.forward = lambda *a, **k: own(*a, **k)
    patched = model.forward
    ddp = nn.parallel.DistributedDataParallel(model)
    batch = make_inputs()
    token_logprobs_from_model(ddp, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)
    assert model.__dict__["forward"] is patched


def test_fsdp2_decoder_sharded_lm_head_replicated(process_group):
    from torch.distributed.fsdp import fully_shard

    config = sf.PolicyLossConfig.preset("grpo")
    plain = build("llama")
    sharded = copy.deepcopy(plain)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded.model)
    batch = make_inputs(6)
    kwargs = dict(logits_to_keep=K, old_logp=batch["old_logp"], advantages=batch["advantages"],
                  response_mask=batch["response_mask"], config=config)
    for model in (plain, sharded):
        policy_loss_from_model(model, batch["input_ids"], batch["attention_mask"], **kwargs).loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters()):
        got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        torch.testing.assert_close(got, p.grad, msg=name)


def test_fsdp2_sharded_lm_head_is_refused(process_group):
    from torch.distributed.fsdp import fully_shard

    model = build("llama")
    fully_shard(model)
    batch = make_inputs()
    with pytest.raises(ValueError, match="leave lm_head unsharded"):
        token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument():
    model = build("llama")
    batch = make_inputs()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    config = sf.PolicyLossConfig.preset("grpo")

    def loss(**over):
        kw = dict(logits_to_keep=K, old_logp=batch["old_logp"], advantages=batch["advantages"],
                  response_mask=batch["response_mask"], config=config)
        kw.update(over)
        return policy_loss_from_model(model, ids, mask, **kw)

    with pytest.raises(ValueError, match="has no output embedding"):
        token_logprobs_from_model(model.model, ids, mask, logits_to_keep=K)
    for bad in (L, L + 3, 0, -1):
        with pytest.raises(ValueError, match=r"logits_to_keep must be in \[1, L - 1\]"):
            token_logprobs_from_model(model, ids, mask, logits_to_keep=bad)
    with pytest.raises(TypeError, match="logits_to_keep must be an int"):
        token_logprobs_from_model(model, ids, mask, logits_to_keep=2.0)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        token_logprobs_from_model(model, ids, mask[:, 1:], logits_to_keep=K)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        token_logprobs_from_model(model, ids.float(), mask, logits_to_keep=K)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, L\)"):
        token_logprobs_from_model(model, ids[0], mask[0], logits_to_keep=K)
    with pytest.raises(ValueError, match=r"response_mask must have shape \(3, 6\)"):
        loss(response_mask=mask)
    with pytest.raises(ValueError, match="old_logp must have shape"):
        loss(old_logp=batch["old_logp"][:, 1:])
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig"):
        loss(config="grpo")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        token_logprobs_from_model("Qwen/Qwen2-0.5B", ids, mask, logits_to_keep=K)
