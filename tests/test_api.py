"""Advantages, segments, backend_info, torch.compile and opcheck."""

import contextlib

import pytest
import torch

import sppo_fast as sf
from sppo_fast import ops


def test_every_spec_name_is_exported():
    names = ["token_logprobs", "linear_logprobs", "segment_ids", "newline_token_ids", "PolicyLossConfig",
             "EntropyAdaptiveClip", "policy_loss", "fused_policy_loss", "fused_linear_policy_loss",
             "PolicyLossOutput", "sequence_advantage", "value_bce_loss", "group_advantage", "rloo_advantage",
             "gae", "backend_info"]
    for name in names:
        assert hasattr(sf, name), name
    assert sf.PolicyLossOutput._fields == ("loss", "logp", "entropy", "metrics")


def test_sppo_advantage_and_critic_loss():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    z = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    adv = sf.sequence_advantage(rewards, z)
    torch.testing.assert_close(adv, rewards - torch.sigmoid(z.detach()))
    assert not adv.requires_grad
    loss = sf.value_bce_loss(z, rewards)
    expected = -(torch.log(torch.sigmoid(z)) * rewards + torch.log(1 - torch.sigmoid(z)) * (1 - rewards)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(z.grad, (torch.sigmoid(z.detach()) - rewards) / 3)


def test_group_and_rloo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    grpo = sf.group_advantage(r, 3)
    g = r.reshape(2, 3)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(grpo, expected)
    assert (sf.group_advantage(r, 3)[3:] == 0).all()  # identical rewards: no signal, no NaN
    torch.testing.assert_close(sf.group_advantage(r, 3, scale="none"), (g - g.mean(1, keepdim=True)).reshape(-1))
    rloo = sf.rloo_advantage(r, 3)
    torch.testing.assert_close(rloo[:3], torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = sf.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.7
    d1 = 0.9 * 0.7 - 0.6
    d0 = 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]))
    # a hole in the mask is skipped: the next masked value bootstraps across it
    adv_hole, _ = sf.gae(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([[0.5, 3.0, 0.7]]),
                         torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv_hole, torch.tensor([[1.0 - 0.5, 0.0, 1.0 - 0.7]]))


def test_segment_ids_by_hand():
    tokens = torch.tensor([[5, 9, 5, 5, 9, 5], [9, 9, 5, 5, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    ids = sf.segment_ids(tokens, [9], mask=mask)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[0, 0, 1, 1, 1, -1], [0, 1, 2, 2, 2, -1]]
    assert sf.segment_ids(tokens, torch.tensor([9, 0])).tolist()[1] == [0, 1, 2, 2, 2, 2]
    prompt_masked = sf.segment_ids(tokens, [9], mask=torch.tensor([[0, 0, 1, 1, 1, 1]] * 2))
    assert prompt_masked.tolist() == [[-1, -1, 0, 0, 0, 1], [-1, -1, 0, 0, 0, 0]]


def test_newline_token_ids():
    class CharTokenizer:
        vocab = ["a", "\n", "b", "c\n", " "]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    assert sf.newline_token_ids(CharTokenizer()) == [1, 3]


def test_backend_info_names_every_device():
    info = sf.backend_info()
    assert set(info) >= {"cpu", "cuda"}
    assert any(name in info["cpu"] for name in ("native", "reference"))


def test_reference_warning_is_given_once(monkeypatch):
    from sppo_fast import dispatch
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "choose", lambda device: ("reference", "testing"))
    with pytest.warns(UserWarning, match="reference"):
        dispatch.backend_for("cpu")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.backend_for("cpu")


def _opcheck_inputs():
    torch.manual_seed(0)
    logits = torch.randn(5, 13, requires_grad=True)
    targets = torch.randint(0, 13, (5,))
    return logits, targets


def test_opcheck_kernel_ops(backend):
    logits, targets = _opcheck_inputs()
    logits = logits.to(backend[1]).detach().requires_grad_(True)
    targets = targets.to(backend[1])
    torch.library.opcheck(ops.token_logprobs_forward, (logits, targets, 1.0, -100, True, False))
    lse = torch.logsumexp(logits.detach(), -1)
    entropy, g = torch.rand(5, device=logits.device), torch.randn(5, device=logits.device)
    torch.library.opcheck(ops.token_logprobs_backward, (logits.detach(), targets, lse, entropy, g, g, 1.0, -100))
    torch.library.opcheck(ops.token_logprobs_backward_,
                          (logits.detach().clone(), targets, lse, entropy, g, None, 1.0, -100))
    hidden = torch.randn(5, 4, device=logits.device, requires_grad=True)
    weight = torch.randn(13, 4, device=logits.device, requires_grad=True)
    torch.library.opcheck(ops.linear_logprobs_forward, (hidden, weight, None, targets, 1.0, -100, True, 2))
    torch.library.opcheck(ops.linear_logprobs_backward,
                          (hidden.detach(), weight.detach(), None, targets, lse, entropy, g, g, 1.0, -100, 2))


def test_torch_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    B, T, V, H = 2, 4, 17, 8
    config = sf.PolicyLossConfig.preset("sspo")
    targets = torch.randint(0, V, (B, T))
    segments = sf.segment_ids(targets, [3])
    args = (torch.zeros(B, T), torch.randn(B), torch.ones(B, T))

    def loss_fn(logits, hidden, weight):
        a = sf.fused_policy_loss(logits, targets, *args, config, segment_ids=segments).loss
        b = sf.fused_linear_policy_loss(hidden, weight, targets, *args, config, segment_ids=segments).loss
        return a + b

    logits = torch.randn(B, T, V, requires_grad=True)
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(logits, hidden, weight)
    got.backward()
    grads = [t.grad.clone() for t in (logits, hidden, weight)]
    for t in (logits, hidden, weight):
        t.grad = None
    expected = loss_fn(logits, hidden, weight)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for g, t in zip(grads, (logits, hidden, weight)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_low_precision_head_takes_one_chunk_when_that_holds_less_memory(monkeypatch, dtype):
    """plan.default_chunk_size: a bf16/fp16 head takes every valid row in one chunk while rows <= size + H
    (several chunks would hold a chunk's logits and an fp32 weight-gradient accumulator); the one chunk writes the
    weight gradient straight in the weight's dtype. fp32 heads keep chunks of `size`. Values and gradients
    meet §5 against fp64, as the chunked call does."""
    import sppo_fast.api as api
    import sppo_fast.chunks as chunks
    from sppo_fast.plan import default_chunk_size

    V, H, B, T = 70000, 64, 3, 100  # size = 256 rows; 300 tokens <= 256 + 64
    assert default_chunk_size(V) == 256
    assert default_chunk_size(V, H, 300, torch.bfloat16) == 300
    assert default_chunk_size(V, H, 321, torch.bfloat16) == 256
    assert default_chunk_size(V, H, 300, torch.float32) == 256
    plans, accumulators = [], []
    real_plan, real_grads = api.plan_linear_loss, chunks.LinearGrads.__init__
    monkeypatch.setattr(api, "plan_linear_loss", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])

    def spy(self, *a, **k):
        real_grads(self, *a, **k)
        accumulators.append(self.weight_blocks[0][1].dtype)

    monkeypatch.setattr(chunks.LinearGrads, "__init__", spy)
    g = torch.Generator().manual_seed(0)
    hidden64 = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = sf.linear_logprobs(hidden64, weight64, targets).float() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    config = sf.PolicyLossConfig.preset("dapo")

    def run(x, w, **kw):
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = sf.fused_linear_policy_loss(x, w, targets, old.to(x.dtype), adv.to(x.dtype), mask, config, **kw)
        return (out.loss, *torch.autograd.grad(out.loss, [x, w]))

    ours = run(hidden64.to(dtype), weight64.to(dtype))
    one = dtype == torch.bfloat16
    assert len(plans[-1].chunks) == (1 if one else 2)
    assert accumulators[-1] == (torch.bfloat16 if one else torch.float32)
    chunked = run(hidden64.to(dtype), weight64.to(dtype), chunk_size=128)
    assert len(plans[-1].chunks) == 3 and accumulators[-1] == torch.float32
    oracle = run(hidden64, weight64)
    tol = 1e-2 if one else 1e-5
    for a, b, ref in zip(ours, chunked, oracle):
        error = (a.double() - ref).abs().max()
        assert error <= (b.double() - ref).abs().max() + tol * max(1.0, float(ref.abs().max()))


def test_a_bf16_heads_fp32_weight_gradient_takes_bf16_products_where_the_cpu_has_them(monkeypatch):
    """chunks.bf16_products (where the native backend's own product does not serve:
    tests/test_weight_grad_bf16.py): the chunked weight gradient of a bf16 head accumulates in fp32 through
    oneDNN's bf16 units (its operands are bf16 values, so narrowing them is exact): the same gradient as
    plain fp32 products, the process-wide flag restored after the call, and nothing changed for fp32."""
    import sppo_fast.chunks as chunks

    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 300, 64, 3001
    hidden = torch.randn(B, T, H, generator=g).bfloat16()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).bfloat16()
    targets = torch.randint(0, V, (B, T), generator=g)
    old, adv, mask = -8 + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, generator=g), torch.ones(B, T)
    config = sf.PolicyLossConfig.preset("dapo")
    seen = []
    real = chunks.bf16_products
    monkeypatch.setattr(chunks, "weight_grad_product", lambda *a: None)  # torch's product, which this tests
    monkeypatch.setattr(chunks, "bf16_products", lambda w, acc: seen.append(torch.backends.mkldnn.matmul.fp32_precision)
                        or real(w, acc))

    def weight_grad(h, w):
        w = w.detach().requires_grad_(True)
        out = sf.fused_linear_policy_loss(h, w, targets, old, adv, mask, config, chunk_size=128)
        return torch.autograd.grad(out.loss, w)[0]

    before = torch.backends.mkldnn.matmul.fp32_precision
    fast = weight_grad(hidden, weight)
    assert seen and torch.backends.mkldnn.matmul.fp32_precision == before
    monkeypatch.setattr(chunks, "_cpu_has_bf16_dot", lambda: False)
    plain = weight_grad(hidden, weight)
    ulp = plain.float().abs() * 2.0 ** -7
    assert ((fast.float() - plain.float()).abs() <= ulp).all()
    assert ((fast != plain).float().mean() < 0.01)
    w32 = weight.float()
    assert isinstance(chunks.bf16_products(w32, torch.empty(1)), contextlib.nullcontext)
