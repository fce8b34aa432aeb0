"""The benchmark's baselines (sppo_fast/bench/ops.py) compute what sppo_fast computes: the same loss
and the same gradient on a small case, so that no speed-up in bench/results comes from a baseline doing
different work. The compiled variants are torch.compile of these same functions (not compiled here:
seconds each). Also: PyTorch 2.13's chunked F.linear_cross_entropy gives our log-probs, the floors'
arithmetic, the load flag, and the benchmarks' place in the import graph (nothing in the core imports
them; they import only downward)."""

import ast
from pathlib import Path

import pytest
import torch

import sppo_fast
from sppo_fast.bench import floors, harness, ops
from sppo_fast.trainer.loss_impls import torch_lce_logprobs

TOKENS, VOCAB, HIDDEN = 64, 1000, 32
PACKAGE = Path(sppo_fast.__file__).resolve().parent


def grad_of(op, impl, preset, inp, wrt, lce_options=None):
    fn = ops.build_fn(op, impl, preset, lce_options)
    x = tuple(t.detach().clone().requires_grad_(True) for t in wrt)
    loss = fn(x if op == "fused_linear" else x[0], inp)
    return loss.detach().double(), [g.double() for g in torch.autograd.grad(loss, x)]


def assert_same(got, want, what):
    (loss, grads), (loss_ref, grads_ref) = got, want
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7, msg=f"{what}: loss")
    for g, ref in zip(grads, grads_ref):
        scale = ref.abs().max().item()
        assert (g - ref).abs().max().item() <= 1e-4 * scale + 1e-9, f"{what}: gradient"


@pytest.mark.parametrize("impl", ["torch_eager", "verl_eager", "trl_eager", "oracle", "sppo_fast_inplace",
                                  "sppo_fast_two_pass", "sppo_fast_one_pass"])
def test_from_logits_baselines_compute_the_dapo_loss_and_gradient(impl):
    if impl.startswith("verl"):
        pytest.importorskip("verl.trainer.ppo.core_algos")
    if impl.startswith("trl"):
        pytest.importorskip("trl")
    inp = ops.make_inputs(TOKENS, VOCAB, torch.float32, seed=3)
    want = grad_of("fused_policy_loss", "sppo_fast", "dapo", inp, [inp["logits"]])
    assert_same(grad_of("fused_policy_loss", impl, "dapo", inp, [inp["logits"]]), want, impl)


@pytest.mark.parametrize("preset", ["gspo", "sspo"])
def test_the_idiomatic_baseline_follows_the_preset(preset):
    inp = ops.make_inputs(TOKENS, VOCAB, torch.float32, seed=4)
    want = grad_of("fused_policy_loss", "sppo_fast", preset, inp, [inp["logits"]])
    assert_same(grad_of("fused_policy_loss", "torch_eager", preset, inp, [inp["logits"]]), want, preset)


def test_token_logprobs_baseline():
    inp = ops.make_inputs(TOKENS, VOCAB, torch.float32, seed=5)
    want = grad_of("token_logprobs", "sppo_fast", None, inp, [inp["logits"]])
    assert_same(grad_of("token_logprobs", "torch_eager", None, inp, [inp["logits"]]), want, "torch_eager")


@pytest.mark.parametrize("impl", ["torch_eager", "trl_chunked", "torch_lce", "sppo_fast_chunk128"])
def test_linear_baselines_compute_the_dapo_loss_and_gradients(impl):
    """The DAPO loss uses no entropy, so torch_lce (which gives none) computes the same loss."""
    if impl.startswith("trl"):
        pytest.importorskip("trl")
    inp = ops.make_inputs(TOKENS, VOCAB, torch.float32, hidden=HIDDEN, seed=6)
    wrt = [inp["hidden"], inp["weight"]]
    want = grad_of("fused_linear", "sppo_fast", "dapo", inp, wrt)
    assert_same(grad_of("fused_linear", impl, "dapo", inp, wrt), want, impl)


def test_torch_lce_tuned_sweeps_and_keeps_the_fastest_options():
    inp = ops.make_inputs(TOKENS, VOCAB, torch.float32, hidden=HIDDEN, seed=7)
    x = (inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True))
    best, sweep = ops.lce_sweep(x, list(x), inp, "fp32")
    assert [s["batch_chunk_size"] for s in sweep] == [TOKENS]  # every candidate above 64 rows is all of them
    assert best == {"batch_chunk_size": TOKENS, "acc_policy": "compact"}
    want = grad_of("fused_linear", "sppo_fast", "dapo", inp, list(x))
    assert_same(grad_of("fused_linear", "torch_lce", "dapo", inp, list(x), ops.lce_options_of(best)), want, "tuned")
    assert ops.lce_resolved(ops.lce_options_of(best), x)["batch_chunk_size"] == TOKENS
    assert [c["batch_chunk_size"] for c in ops.lce_candidates(2048, "bf16")] == [128, 256, 512, 1024, 2048]
    assert {c["acc_policy"] for c in ops.lce_candidates(2048, "bf16")} == {"accurate"}


def test_slow_implementations_make_fewer_repetitions():
    case = {"op": "fused_linear", "impl": "torch_lce", "preset": "dapo", "tokens": 64, "vocab": 512, "dtype": "fp32",
            "hidden": HIDDEN, "reps": 5, "warmup": 2}
    fast = ops.run_child(dict(case, max_case_s=600.0))
    assert "reps" not in fast and fast["lce_options"]["chunking_method"] == "aspect_ratio:2"
    slow = ops.run_child(dict(case, max_case_s=1e-6))
    assert (slow["reps"], slow["warmup"], slow["reps_cut_by_budget_s"]) == (1, 0, 1e-6) and slow["fwd_bwd_ms"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 16])
def test_torch_lce_gives_our_logprobs(dtype, chunk):
    """PyTorch 2.13's F.linear_cross_entropy(reduction="none") gives the log-probs of
    sppo_fast.linear_logprobs: to fp32 rounding in fp32; in bf16 torch rounds its result to bf16 (8 bits:
    0.03 at a log-prob of -10) and both round the logits' matmul to bf16, so within 1% + 0.1."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 40, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 3 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (3, 40), generator=gen)
    targets[0, -5:] = -100  # ignored positions: 0 from both
    for temperature in (1.0, 0.7):
        ours = sppo_fast.linear_logprobs(hidden, weight, targets, temperature=temperature)
        theirs = torch_lce_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk)
        assert theirs.shape == ours.shape and theirs.dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(theirs, ours, rtol=1e-2, atol=0.1)
        assert (theirs[0, -5:] == 0).all() and (ours[0, -5:] == 0).all()


def test_default_cases_leave_the_oracle_out_and_peers_to_dapo():
    args = ops.parse_args(["--presets", "dapo", "gspo"])
    cases = list(ops.cases(args))
    assert cases and not any(c["impl"] == ops.ORACLE for c in cases)
    assert {c["preset"] for c in cases if c["impl"] in ops.PEER_IMPLS} == {"dapo"}
    assert {(c["dtype"], c["vocab"]) for c in cases if c["op"] != "fused_linear"} == {("fp32", 32000),
                                                                                     ("bf16", 151936)}
    linear = [c for c in cases if c["op"] == "fused_linear"]
    assert {(c["dtype"], c["vocab"]) for c in linear} == {("fp32", 32000), ("bf16", 151936)}
    assert {"torch_lce", "torch_lce_tuned"} <= {c["impl"] for c in linear}
    with_oracle = ops.parse_args(["--impls", "sppo_fast", "oracle", "--ops", "fused_policy_loss"])
    assert {c["impl"] for c in ops.cases(with_oracle)} == {"sppo_fast", "oracle"}
    old_flag = ops.parse_args(["--linear-vocab", "4096", "--ops", "fused_linear"])
    assert {(c["dtype"], c["vocab"]) for c in ops.cases(old_flag)} == {("fp32", 4096)}


@pytest.mark.parametrize("cpu, isa, slug", [
    ("AMD EPYC", "AVX512", "amd-epyc-avx512-2core"),
    ("AMD EPYC", "AVX2", "amd-epyc-avx2-2core"),
    ("Intel(R) Xeon(R) Platinum 8480C", "AVX512", "intel-xeon-platinum-8480c-avx512-2core"),
    ("AMD EPYC 7763 64-Core Processor", "AVX2", "amd-epyc-7763-avx2-2core"),
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", "DEFAULT", "intel-xeon-default-2core"),
])
def test_results_are_named_after_the_machine_and_its_isa(cpu, isa, slug):
    assert harness.machine_slug(cpu, 2, isa) == slug


def test_this_machines_results_name_carries_torchs_isa_tier():
    assert torch.backends.cpu.get_cpu_capability().lower() in harness.machine_slug()


# --- floors and load ------------------------------------------------------------------------------

MACHINE = {"status": "ok", "stream_gbps": 10.0, "threads": 2,
           "exp": {"fp32": {"exp_per_s": 4e9}, "bf16": {"exp_per_s": 2e9}}}


def test_logits_floors_count_the_streams_and_the_exps():
    f = floors.logits_floors(1000, 1000, "fp32", MACHINE)  # 1e6 logits, 4 MB
    assert f["fwd"] == {"bytes": 4e6, "stream_ms": 0.4, "exp_ms": 0.25, "floor_ms": 0.4}
    assert f["fwd_bwd"] == {"bytes": 12e6, "stream_ms": 1.2, "exp_ms": 0.5, "floor_ms": 1.2}
    b = floors.logits_floors(1000, 1000, "bf16", MACHINE)  # half the bytes, half the exp rate
    assert (b["fwd_bwd"]["stream_ms"], b["fwd_bwd"]["exp_ms"], b["fwd_bwd"]["floor_ms"]) == (0.6, 1.0, 1.0)


def test_rows_get_their_percent_of_floor():
    row = {"status": "ok", "op": "fused_policy_loss", "tokens": 1000, "vocab": 1000, "dtype": "fp32",
           "fwd_ms": 0.8, "fwd_bwd_ms": 2.4}
    got = floors.floors_of_row(row, MACHINE, {})
    assert (got["fwd_pct_of_floor"], got["fwd_bwd_pct_of_floor"], got["fwd_bwd_pct_of_stream_floor"]) == (50, 50, 50)
    mm = {"status": "ok", "mm_ms": {"logits": 1.0, "grad_hidden": 1.0, "grad_weight": 2.0}, "mm3_ms": 4.0}
    linear = dict(row, op="fused_linear", hidden=8, fwd_ms=2.0, fwd_bwd_ms=5.0)
    got = floors.floors_of_row(linear, MACHINE, {(1000, 8, 1000, "fp32"): mm})
    assert (got["fwd_pct_of_floor"], got["fwd_bwd_pct_of_floor"]) == (50, 80)
    assert floors.floors_of_row({"status": "skipped"}, MACHINE, {}) == {"status": "skipped"}


def test_the_floors_paragraph_names_the_floors_of_the_runs_merged_into_the_file():
    from sppo_fast.bench import ops_report

    mm = {"status": "ok", "tokens": 2048, "hidden": 512, "vocab": 32000, "dtype": "fp32", "mm3_ms": 1144.0,
          "mm_ms": {"logits": 390.0, "grad_hidden": 381.0, "grad_weight": 374.0}}
    machine = dict(MACHINE, stream_bytes=2**30, exp={"fp32": {"exp_per_s": 3.95e9}})
    text = ops_report.floors_paragraph({"floors": {"matmul": [mm]}, "earlier_floors": [{"machine": machine}]})
    assert "this run" in text and "**1144 ms**" in text
    assert "earlier runs merged here" in text and "streaming bandwidth **10.0 GB/s**" in text
    assert "fp32 **3.95 G/s**" in text
    alone = ops_report.floors_paragraph({"floors": {"machine": machine}})
    assert "10.0 GB/s" in alone and "earlier runs" not in alone


def test_the_floor_is_the_better_of_the_two_measurements():
    before = {"machine": dict(MACHINE), "matmul": [{"status": "ok", "tokens": 1, "hidden": 2, "vocab": 3,
                                                    "dtype": "fp32", "mm3_ms": 5.0}]}
    after = {"machine": dict(MACHINE, stream_gbps=12.0, exp={"fp32": {"exp_per_s": 3e9}}),
             "matmul": [dict(before["matmul"][0], mm3_ms=4.0)]}
    best = ops.best_floors(before, after)
    assert best["machine"]["stream_gbps"] == 12.0 and best["machine"]["exp"]["fp32"]["exp_per_s"] == 4e9
    assert best["machine"]["exp"]["bf16"]["exp_per_s"] == 2e9 and best["matmul"][0]["mm3_ms"] == 4.0
    assert best["runs"] == [before, after]


def test_busy_rows_are_flagged_or_refused(monkeypatch):
    policy = harness.LoadPolicy(limit=1.5)
    assert harness.default_load_limit(2) == 1.5
    assert harness.load_flag({"load_before": 1.2, "others_cores": 0.1}, policy) is None
    assert "load average 2.5 > 1.5" in harness.load_flag({"load_before": 2.5, "others_cores": 0.1}, policy)
    assert "0.90 cores" in harness.load_flag({"load_before": 1.0, "others_cores": 0.9}, policy)
    assert harness.load_flag({"load_before": 1.0, "others_cores": 0.1, "steal_cores": 0.1}, policy) is None
    assert "hypervisor gave 0.34 cores" in harness.load_flag({"load_before": 1.0, "steal_cores": 0.34}, policy)
    monkeypatch.setattr(harness, "load_average", lambda: 3.0)
    row = harness.run_in_child("nowhere", {}, {"impl": "x"}, 10, load=harness.LoadPolicy(limit=1.5, refuse=True))
    assert row["status"].startswith("refused: load average 3 > 1.5")


def test_the_floors_child_measures_a_small_matmul():
    out = floors.matmul_floor(16, 8, 32, "fp32", reps=2)
    assert set(out["mm_ms"]) == {"logits", "grad_hidden", "grad_weight"} and out["mm3_ms"] > 0


# --- the import graph ------------------------------------------------------------------------------

# each imports only those before it
BENCH_LAYERS = ("harness", "floors", "ops_report", "ops", "interleaved", "long_cot", "vocab_parallel", "cli")


def _imports(path):
    """The sppo_fast modules a file imports (absolute names; relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n == "sppo_fast" or n.startswith("sppo_fast.")}


def test_nothing_in_the_core_imports_the_benchmarks_or_the_trainer():
    core = [p for p in PACKAGE.rglob("*.py") if not {"bench", "trainer"} & set(p.relative_to(PACKAGE).parts)]
    assert core
    for path in core:
        bad = {n for n in _imports(path) if n.startswith(("sppo_fast.bench", "sppo_fast.trainer"))}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_benchmarks_import_only_downward():
    assert {p.stem for p in (PACKAGE / "bench").glob("*.py")} == set(BENCH_LAYERS) | {"__init__"}
    for i, name in enumerate(BENCH_LAYERS):
        used = {n.split(".")[2] for n in _imports(PACKAGE / "bench" / f"{name}.py")
                if n.startswith("sppo_fast.bench.") and n.split(".")[2] in BENCH_LAYERS}
        above = used - set(BENCH_LAYERS[:i])
        assert not above, f"bench/{name}.py imports {sorted(above)} (above or beside it)"
    assert not (PACKAGE / "bench_cli.py").exists() and not (PACKAGE / "bench_long_cot.py").exists()


def test_long_cot_merge_keeps_the_columns_and_lengths_of_the_rows_it_keeps():
    from sppo_fast.bench import long_cot

    def row(impl, length, step_s):
        phases = {name: {"hwm_mib": 1024.0} for name in ("forward", "loss", "backward", "optimizer")}
        return {"impl": impl, "length": length, "status": "ok", "step_s": step_s, "peak_mib": 1024.0,
                "loss_stage_mib": 512.0, "phases": phases, "loss": 0.5}

    def run(date, impls, lengths, rows, capability="AVX512"):
        return {"environment": {"date": date, "cpu": "cpu", "cores": 2, "torch": "2.13", "cpu_capability": capability},
                "settings": {"impls": impls, "lengths": lengths, "budget_gib": 16, "hidden": 8, "layers": 1,
                             "heads": 1, "vocab": 32},
                "results": rows}

    old = run("day1", ["fused_linear", "compile"], [1024, 4096],
              [row("fused_linear", 1024, 9.0), row("compile", 1024, 5.0), row("fused_linear", 4096, 30.0)], "AVX2")
    new = run("day2", ["torch_lce", "fused_linear"], [1024],
              [row("fused_linear", 1024, 4.0), row("torch_lce", 1024, 8.0)])
    report = long_cot.merged(old, new)
    assert report["settings"]["impls"] == ["fused_linear", "compile", "torch_lce"]  # the table's order
    assert report["settings"]["lengths"] == [1024, 4096]
    assert {(r["impl"], r["length"], r["step_s"]) for r in report["results"]} == {
        ("compile", 1024, 5.0), ("fused_linear", 4096, 30.0), ("fused_linear", 1024, 4.0), ("torch_lce", 1024, 8.0)}
    assert report["run_dates"] == ["day1", "day2"]
    report["targets"] = long_cot.targets(report["results"], 16, [1024, 4096], report["settings"]["impls"])
    table = long_cot.markdown(report)
    assert "| response tokens | fused_linear | compile | torch_lce |" in table
    assert "5.0 s [run of day1, cpu AVX2] |" in table and "4.0 s |" in table  # a kept cell names its run
    assert report["targets"]["time_vs_torch_lce"] == {1024: 0.5}
    assert report["targets"]["time_vs_compile"] == {}  # day 1's compile against day 2's fused_linear: no ratio
    assert "merged with those of earlier runs on day1" in table
    same_machine = long_cot.merged(dict(old, environment=new["environment"]), new)
    assert all("run" not in r for r in same_machine["results"])  # rows of the same machine compare
    redone = long_cot.merged(old, run("day2", ["fused_linear", "compile"], [1024, 4096], [
        row(i, n, 1.0) for i in ("fused_linear", "compile") for n in (1024, 4096)]))
    assert redone["run_dates"] == ["day2"]  # nothing kept from day 1
    redone["targets"] = long_cot.targets(redone["results"], 16, [1024, 4096], redone["settings"]["impls"])
    both_fit = long_cot.markdown(redone)  # both fit the grid's end: no "1x longer" ratio
    assert "fused_linear and compile both fit the grid's longest response (4096)" in both_fit
    assert "longer responses than compile" not in both_fit


def test_interleaved_runs_append_to_one_report(tmp_path):
    """bench/bench_interleaved.py at a small shape: every implementation timed each round, the ratios to the
    first one's time in the same round, each run appended to the JSON and listed in the markdown; a bad
    --impls or --shape is refused before anything runs."""
    from sppo_fast.bench import interleaved

    out = tmp_path / "interleaved.json"
    argv = ["--shape", "fp32:300", "--hidden", "16", "--tokens", "48", "--rounds", "2", "--warmup", "0",
            "--impls", "sppo_fast", "torch", "torch_lce:16", "--out", str(out)]
    assert interleaved.main(argv) == 0 and interleaved.main(argv) == 0
    report = __import__("json").loads(out.read_text())
    assert len(report["runs"]) == 2
    rows = report["runs"][0]["results"]
    assert [r["impl"] for r in rows] == ["sppo_fast", "torch", "torch_lce:16"]
    assert rows[0]["ratio"] == 1.0 and all(len(r["rounds"]) == 2 and r["wall_ms"] > 0 for r in rows)
    assert (tmp_path / "interleaved.md").read_text().count("| torch_lce:16 |") == 2
    logits_argv = ["--op", "fused_policy_loss", "--shape", "fp32:300", "--tokens", "48", "--rounds", "2",
                   "--warmup", "1", "--impls", "sppo_fast_inplace", "sppo_fast", "--out", str(tmp_path / "l.json")]
    assert interleaved.main(logits_argv) == 0
    inplace, fresh = __import__("json").loads((tmp_path / "l.json").read_text())["runs"][0]["results"]
    # the in-place backward works on a copy: the rounds after it see the same logits
    assert inplace["loss"] == pytest.approx(fresh["loss"], rel=1e-6)
    for bad in (["--impls", "sppo_fast", "torch_lce:0"], ["--impls", "nope"]):
        with pytest.raises(SystemExit, match="--impls"):
            interleaved.main(argv[:-6] + bad + ["--out", str(out)])
    with pytest.raises(SystemExit):
        interleaved.main(["--shape", "fp16:10"])


def test_an_exp_rate_from_a_bent_line_is_not_taken_for_the_floor():
    """floors.rate_from_blocks measures how far the block times lie from the fitted line; best_floors takes
    the higher of two rates only among straight-line fits. The times below are those of one run on the
    2-core AMD EPYC (microseconds): before the cases a burst bent the fp32 line (22.9 G/s read), after
    them it was straight (8.3 G/s)."""
    sizes = [16384 * k for k in range(1, 8)]
    bent = [56.88, 77.74, 81.67, 87.59, 61.02, 64.04, 75.24]
    straight = [41.75, 45.3, 49.57, 53.15, 56.83, 61.27, 65.76]
    a = floors.rate_from_blocks(sizes, [t * 1e-6 for t in bent], 2)
    b = floors.rate_from_blocks(sizes, [t * 1e-6 for t in straight], 2)
    assert a["exp_per_s"] > 2 * b["exp_per_s"] and a["exp_fit_error"] > 0.1 > 0.02 > b["exp_fit_error"]
    assert 7.5e9 < b["exp_per_s"] < 9e9
    assert ops._better_exp_rate(a, b) is b and ops._better_exp_rate(b, a) is b
    assert ops._better_exp_rate(dict(b, exp_per_s=1), b) is b  # both trusted: the higher rate
    assert ops._better_exp_rate(a, None) is a and ops._better_exp_rate(None, None) is None


def test_a_stream_target_is_not_judged_when_a_row_beat_the_floor():
    """ops_report: a sppo_fast row faster than its run's stream floor shows that the copy measuring the
    bandwidth was no bound in that run (it pays a write-allocate read that in-place and non-temporal
    writes do not): the target says so instead of met."""
    from sppo_fast.bench import ops_report

    ok = {"status": "ok"}
    assert ops_report._stream_mark(95, 90, dict(ok, fwd_bwd_pct_of_stream_floor=99)) == "met"
    assert ops_report._stream_mark(50, 60, dict(ok, fwd_bwd_pct_of_stream_floor=55)) == "NOT met"
    assert "not judged" in ops_report._stream_mark(95, 90, dict(ok, fwd_bwd_pct_of_stream_floor=112))
    assert "not judged" in ops_report._stream_mark(101, 90, {})


def test_the_one_pass_column_compares_sppo_fast_with_its_two_pass_form():
    """ops_report: sppo_fast (the plan's choice) against sppo_fast_two_pass, issue 18's 1.3x target."""
    from sppo_fast.bench import ops_report

    ok = {"status": "ok"}
    met = ops_report._one_pass_cell(dict(ok, fwd_bwd_ms=150.0), dict(ok, fwd_bwd_ms=210.0), "bf16")
    assert met == "210: 1.40x (met)"
    assert "NOT met" in ops_report._one_pass_cell(dict(ok, fwd_bwd_ms=180.0), dict(ok, fwd_bwd_ms=210.0), "bf16")
    assert ops_report._one_pass_cell(dict(ok, fwd_bwd_ms=150.0), {}, "bf16") == ""
    same = ops_report._one_pass_cell(dict(ok, fwd_bwd_ms=30.0), dict(ok, fwd_bwd_ms=45.0), "fp32")
    assert same.startswith("45.0: 1.50x (NOT met; the plan keeps two passes at fp32")


def test_the_linear_target_counts_sppo_fast_at_128_rows_per_chunk():
    """ops_report: against torch_lce_tuned, the linear target is met by sppo_fast's default chunks or by
    sppo_fast_chunk128, each judged on its own time and memory."""
    from sppo_fast.bench import ops_report

    def row(ms, mib):
        return {"status": "ok", "fwd_bwd_ms": ms, "fwd_bwd_peak_mib": mib, "fwd_bwd_pct_of_floor": 90.0}

    lce = {"torch_lce": row(5000, 70), "torch_lce_tuned": row(3000, 80)}
    ours = row(1400, 120)  # 2.1x faster than the tuned one, but more memory
    cell = lambda impls: ops_report._linear_target_row("case", True, ours, impls, {"floor_ms": 1200})  # noqa: E731
    assert cell(lce).endswith("NOT met |")
    small_ok = row(1450, 80)  # 2.07x at no more memory than tuned, 3.4x at more memory than the default
    assert "1450: 2.07x faster, 80 vs 80 MiB" in cell(dict(lce, sppo_fast_chunk128=small_ok))
    assert cell(dict(lce, sppo_fast_chunk128=small_ok)).endswith("NOT met |")  # torch_lce's 70 MiB
    assert cell({"torch_lce_tuned": lce["torch_lce_tuned"], "sppo_fast_chunk128": small_ok}).endswith(" met |")
    assert cell(dict(lce, sppo_fast_chunk128=row(1600, 80))).endswith("NOT met |")  # 1.88x
