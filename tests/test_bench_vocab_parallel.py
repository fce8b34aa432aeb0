"""The vocabulary-parallel benchmark (sppo_fast/bench/vocab_parallel.py) in its quick mode, P = 2: its rows
are well formed and every implementation computes the unsharded call's loss."""

import json
import math

import pytest

from sppo_fast.bench import vocab_parallel as vp


def test_shards_are_rows_of_the_whole_weight():
    whole = vp.make_inputs({"dtype": "fp32", "tokens": 64, "hidden": 16, "vocab": 64, "seq_len": 32}, 0, 1)
    for rank in range(4):
        shard = vp.make_inputs({"dtype": "fp32", "tokens": 64, "hidden": 16, "vocab": 64, "seq_len": 32}, rank, 4)
        assert shard["vocab_start"] == 16 * rank
        assert shard["weight"].equal(whole["weight"][16 * rank:16 * (rank + 1)])
        assert shard["hidden"].equal(whole["hidden"]) and shard["targets"].equal(whole["targets"])


def test_the_counter_counts_what_each_collective_sends(monkeypatch):
    import torch
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: None)
    monkeypatch.setattr(dist, "all_gather_into_tensor", lambda output_tensor, input_tensor, *a, **k: None)
    with vp.CollectiveCounter() as counter:
        dist.all_reduce(torch.zeros(10))
        with counter.during("backward"):
            dist.all_gather_into_tensor(torch.zeros(20), input_tensor=torch.zeros(5, dtype=torch.bfloat16))
    assert counter.bytes == {"forward": 40, "backward": 10}
    assert not getattr(dist.all_reduce, "_sppo_counted", False)  # restored


def test_quick_mode_rows_are_well_formed_and_agree(tmp_path):
    if not vp.has_vocab_parallel():
        pytest.skip("sppo_fast.fused_linear_policy_loss has no process_group yet (vocab-parallel API)")
    impls = ["sppo_unsharded", "sppo_vocab_parallel"] + (["megatron_vocab_parallel_ce"] if vp.megatron_available()
                                                         else [])
    out = tmp_path / "vp.json"
    assert vp.main(["--quick", "--ranks", "2", "--impls", *impls, "--settle", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == set(impls)
    for impl, r in rows.items():
        assert r["status"] == "ok", r
        assert r["ranks"] == (1 if impl == "sppo_unsharded" else 2)
        assert r["cpu"] == report["environment"]["cpu"] and r["torch_threads"] == 1
        assert r["step_ms"] > 0 and r["peak_mib"] >= 0 and math.isfinite(r["loss"])
        assert len(r["per_rank"]) == r["ranks"] and r["loss_spread_over_ranks"] == 0.0
    ref = rows["sppo_unsharded"]
    for impl in impls[1:]:
        assert rows[impl]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert rows[impl]["grad_weight_norm"] == pytest.approx(ref["grad_weight_norm"], rel=1e-4)
        assert rows[impl]["grad_hidden_norm"] == pytest.approx(ref["grad_hidden_norm"], rel=1e-4)
        comm = rows[impl]["comm_bytes_per_token"]  # at least the hidden states' gradient, H fp32 per token
        assert sum(comm.values()) >= 4 * 64
    md = out.with_suffix(".md").read_text()
    assert report["environment"]["cpu"] in md and "sppo_vocab_parallel" in md
