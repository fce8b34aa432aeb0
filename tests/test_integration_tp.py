"""sppo_fast.integrations.hf with a tensor-parallel lm_head: `parallelize_module(model, mesh, {"lm_head":
ColwiseParallel(...)})` on 2 gloo ranks (CPU). The policy loss and the log-probs of the sharded model equal
the unsharded model's on every rank, and so do the gradients: lm_head's weight (each rank's shard of it,
gathered) and every parameter below it (embedding, decoder layers, final norm)."""

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from rank_pool import spawn_ranks

WORLD = 2
V, H, B, L, K = 97, 32, 3, 10, 5  # V odd: the shards are uneven (49 + 48)


def _build(kind):
    import transformers

    small = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small))
    raise KeyError(kind)


def _inputs():
    import sppo_fast as sf

    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, V, (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                old_logp=-torch.rand(B, K, generator=gen) * 3 - 3, advantages=torch.randn(B, generator=gen),
                response_mask=(torch.rand(B, K, generator=gen) > 0.2).long(),
                config=sf.PolicyLossConfig.preset("dapo"))


def _run(model, batch):
    from sppo_fast.integrations.hf import policy_loss_from_model, token_logprobs_from_model

    out = policy_loss_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K,
                                 old_logp=batch["old_logp"], advantages=batch["advantages"],
                                 response_mask=batch["response_mask"], config=batch["config"])
    out.loss.backward()
    with torch.no_grad():
        logp, entropy = token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"],
                                                  logits_to_keep=K, return_entropy=True)
    return out, logp, entropy


CASES = (("llama", True), ("qwen2", False))  # ColwiseParallel's logits as local shards, and as DTensors


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for kind, use_local_output in CASES:
        _check(kind, use_local_output, mesh)
    dist.barrier()
    dist.destroy_process_group()


def _check(kind, use_local_output, mesh):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    batch = _inputs()
    plain = _build(kind)
    expected, logp0, ent0 = _run(plain, batch)
    model = _build(kind)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=use_local_output)})
    assert isinstance(model.lm_head.weight, DTensor)
    out, logp, entropy = _run(model, batch)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, **close)
    torch.testing.assert_close(out.logp, expected.logp, **close)
    torch.testing.assert_close(out.entropy, expected.entropy, **close)
    torch.testing.assert_close(logp, logp0, **close)
    torch.testing.assert_close(entropy, ent0, **close)
    want = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        assert grad is not None, name
        torch.testing.assert_close(grad, want[name].grad, **close, msg=f"{kind}: {name}")


def test_colwise_parallel_lm_head_equals_unsharded():
    spawn_ranks(_worker, WORLD)


def test_fsdp_managed_lm_head_is_still_refused():
    """A DTensor lm_head weight that FSDP2 shards (fully_shard on the model) is not a vocabulary split: still
    refused (one gloo process)."""
    from torch.distributed.fsdp import fully_shard

    from sppo_fast.integrations.hf import token_logprobs_from_model

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            model = _build("llama")
            fully_shard(model)
            batch = _inputs()
            with pytest.raises(ValueError, match="leave lm_head unsharded"):
                token_logprobs_from_model(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=K)
        finally:
            dist.destroy_process_group()
