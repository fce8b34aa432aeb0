"""The benchmark's baselines (sppo_fast/bench_cli.py) compute what sppo_fast computes: the same loss
and the same gradient on a small case, so that no speed-up in bench/results comes from a baseline doing
different work. The compiled variants are torch.compile of these same functions (not compiled here:
seconds each)."""

import pytest
import torch

from sppo_fast import bench_cli

TOKENS, VOCAB, HIDDEN = 64, 1000, 32


def grad_of(op, impl, preset, inp, wrt):
    fn = bench_cli.build_fn(op, impl, preset)
    x = tuple(t.detach().clone().requires_grad_(True) for t in wrt)
    loss = fn(x if op == "fused_linear" else x[0], inp)
    return loss.detach().double(), [g.double() for g in torch.autograd.grad(loss, x)]


def assert_same(got, want, what):
    (loss, grads), (loss_ref, grads_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7, msg=f"{what}: loss")
    for g, ref in zip(grads, grads_ref):
        scale = ref.abs().max().item()
        assert (g - ref).abs().max().item() <= 1e-4 * scale + 1e-9, f"{what}: gradient"


@pytest.mark.parametrize("impl", ["torch_eager", "verl_eager", "trl_eager", "oracle", "sppo_fast_inplace"])
def test_from_logits_baselines_compute_the_dapo_loss_and_gradient(impl):
    if impl.startswith("verl"):
        pytest.importorskip("verl.trainer.ppo.core_algos")
    if impl.startswith("trl"):
        pytest.importorskip("trl")
    inp = bench_cli.make_inputs(TOKENS, VOCAB, torch.float32, seed=3)
    want = grad_of("fused_policy_loss", "sppo_fast", "dapo", inp, [inp["logits"]])
    assert_same(grad_of("fused_policy_loss", impl, "dapo", inp, [inp["logits"]]), want, impl)


@pytest.mark.parametrize("preset", ["gspo", "sspo"])
def test_the_idiomatic_baseline_follows_the_preset(preset):
    inp = bench_cli.make_inputs(TOKENS, VOCAB, torch.float32, seed=4)
    want = grad_of("fused_policy_loss", "sppo_fast", preset, inp, [inp["logits"]])
    assert_same(grad_of("fused_policy_loss", "torch_eager", preset, inp, [inp["logits"]]), want, preset)


def test_token_logprobs_baseline():
    inp = bench_cli.make_inputs(TOKENS, VOCAB, torch.float32, seed=5)
    want = grad_of("token_logprobs", "sppo_fast", None, inp, [inp["logits"]])
    assert_same(grad_of("token_logprobs", "torch_eager", None, inp, [inp["logits"]]), want, "torch_eager")


@pytest.mark.parametrize("impl", ["torch_eager", "trl_chunked"])
def test_linear_baselines_compute_the_dapo_loss_and_gradients(impl):
    if impl.startswith("trl"):
        pytest.importorskip("trl")
    inp = bench_cli.make_inputs(TOKENS, VOCAB, torch.float32, hidden=HIDDEN, seed=6)
    wrt = [inp["hidden"], inp["weight"]]
    want = grad_of("fused_linear", "sppo_fast", "dapo", inp, wrt)
    assert_same(grad_of("fused_linear", impl, "dapo", inp, wrt), want, impl)


def test_default_cases_leave_the_oracle_out_and_peers_to_dapo():
    args = bench_cli.parse_args(["--presets", "dapo", "gspo"])
    cases = list(bench_cli.cases(args))
    assert cases and not any(c["impl"] == bench_cli.ORACLE for c in cases)
    assert {c["preset"] for c in cases if c["impl"] in bench_cli.PEER_IMPLS} == {"dapo"}
    assert {(c["dtype"], c["vocab"]) for c in cases if c["op"] != "fused_linear"} == {("fp32", 32000),
                                                                                     ("bf16", 151936)}
    with_oracle = bench_cli.parse_args(["--impls", "sppo_fast", "oracle", "--ops", "fused_policy_loss"])
    assert {c["impl"] for c in bench_cli.cases(with_oracle)} == {"sppo_fast", "oracle"}


@pytest.mark.parametrize("cpu, slug", [
    ("AMD EPYC", "amd-epyc-2core"),
    ("Intel(R) Xeon(R) Platinum 8480C", "intel-xeon-platinum-8480c-2core"),
    ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763-2core"),
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", "intel-xeon-2core"),
])
def test_results_are_named_after_the_machine(cpu, slug):
    assert bench_cli.machine_slug(cpu, 2) == slug
