"""Smoke test of `sppo-fast trl-job` (sppo_fast/trainer/trl_job.py): two RL steps of trl.GRPOTrainer and
SppoFastGRPOTrainer on a tiny policy with a tiny warm start (difficulty-1 arithmetic, so that some
rollouts are right and the first step's loss is not zero), in this process. The report's files are
written, both runs drew the prompts `sppo-fast train` draws, saw the same first rollouts, and their
first-step losses agree to 1e-4 relative. Seconds on 2 cores."""

import json
import os

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")


def test_trl_job_smoke(tmp_path):
    from sppo_fast.trainer.trl_job import FIRST_STEP_TARGET, main

    out = tmp_path / "out"
    argv = ["--tiny", "--in-process", "--steps", "2", "--seeds", "0", "--variants", "trl,sppo_fast",
            "--out", str(out), "--set", "task_difficulty=1", "--set", "warm_start=true", "--set", "sft_steps=150",
            "--set", "hidden_size=32", "--set", "max_new_tokens=12", "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    for name in ("report.md", "report.json", "accuracy_vs_time.png"):
        assert os.path.getsize(out / name) > 0, name
    # the local Hugging Face model directory the runs loaded
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out / "models" / "seed0"))
    report = json.loads((out / "report.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert set(runs) == {"trl", "sppo_fast"}
    for r in runs.values():
        assert r["optimizer_steps"] == 4 and len(r["rows"]) == 4
        assert r["prompts_match_train"], "the TRL dataset must give each step the trainer's prompts"
        assert [e["rl_step"] for e in r["evals"]] == [0, 1, 2]
        assert r["peak_rss_mib"] > 0 and r["median_step_seconds"] > 0
    # same seed, same parameters: the first generation is the same in both
    assert runs["trl"]["generations"][0] == runs["sppo_fast"]["generations"][0]
    (pair,) = report["trl_vs_sppo_fast"]
    first = pair["rows"][0]
    assert first["loss_trl"] != 0.0, "a zero first-step loss would make the comparison vacuous"
    assert pair["first_step_loss_rel_diff"] <= FIRST_STEP_TARGET, first
    assert pair["first_step_within_target"]
    assert abs(first["entropy_trl"] - first["entropy_sppo_fast"]) <= 1e-4 * abs(first["entropy_trl"])
    text = (out / "report.md").read_text()
    assert "sppo-fast trl-job" in text and "First step" in text
