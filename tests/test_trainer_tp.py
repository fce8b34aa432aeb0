"""`sppo-fast train --tensor_parallel 2` under torchrun (gloo, CPU): lm_head and the input embedding split
by vocabulary as DTensors over a 1-D mesh of the 2 ranks, every rank on the same batch, the loss through
fused_linear_policy_loss on the sharded weight. Its first RL step equals the single-process one (loss and
every parameter after the step, gathered whole by the checkpoint); bad combinations are one-line errors."""

import json

import pytest
import torch
from test_trainer import TINY, _torchrun, _weights, tiny

from sppo_fast.trainer.cli import train_main
from sppo_fast.trainer.config import TrainConfig
from sppo_fast.trainer.loop import train
from sppo_fast.trainer.models import build_policy, load_tokenizer

ONE_STEP = dict(algo="sppo", steps=1, save_every=1, rollouts_per_step=4, eval_examples=2)


def _step_one(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == 1)


def test_tensor_parallel_first_step_equals_single_process(tmp_path):
    single = tiny(tmp_path / "single", **ONE_STEP)
    train(single)
    tp = _torchrun(tmp_path, "tp", tensor_parallel=2, **ONE_STEP)
    a, b = _step_one(tmp_path / "single" / "run"), _step_one(tp)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)
    assert b["reward"] == a["reward"] and b["response_length"] == a["response_length"]  # the same rollouts
    assert json.loads((tp / "summary.json").read_text())["world_size"] == 2
    want, got = _weights(str(tmp_path / "single" / "run"), "policy"), _weights(str(tp), "policy")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    torch.manual_seed(0)  # and the step did move the weights
    initial = build_policy(TrainConfig(**TINY), load_tokenizer(TrainConfig()), torch.device("cpu")).state_dict()
    assert not torch.equal(initial["lm_head.weight"], got["lm_head.weight"])


def test_tensor_parallel_needs_the_fused_linear_loss():
    for impl in ("fused", "eager", "torch_lce"):
        with pytest.raises(ValueError, match="loss_impl: tensor_parallel 2 needs loss_impl fused_linear"):
            TrainConfig(tensor_parallel=2, loss_impl=impl)
    with pytest.raises(ValueError, match="fsdp2 does not go with tensor_parallel"):
        TrainConfig(tensor_parallel=2, parallel="fsdp2")


def test_tensor_parallel_must_divide_the_world_size(tmp_path, capsys):
    """A single process asked for 2 tensor-parallel ranks: one line, exit 2, before anything runs."""
    code = train_main(["--tensor_parallel", "2", "--warm_start", "false", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensor_parallel (2) must divide the world size (1" in err[0]
    assert not (tmp_path / "run").exists()
