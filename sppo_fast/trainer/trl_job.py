"""`sppo-fast trl-job`: the bundled job (task, tiny policy, char tokenizer, warm start, reward) run through
TRL 1.16: its own `trl.GRPOTrainer` ("trl"), `sppo_fast.integrations.trl.SppoFastGRPOTrainer` ("sppo_fast",
one import changed) and `SPPOTrainer` ("sppo", one sample per prompt, a `PromptCritic` baseline).

What is the same as `sppo-fast train` under `sppo-fast compare` (docs/compare/; its TrainConfig, --algo grpo
for the group variants and --algo sppo for sppo): the task and its verifier, the policy (built,
warm-started from the same cache, then saved with `save_pretrained` and reloaded as a local Hugging Face
model directory), the prompts of every RL step (`loop.step_examples`, in order: the dataset is those
prompts with TRL's shuffling off), 32 prompts per step (x 8 samples for grpo, x 1 for sppo), two optimizer
steps per rollout batch (TRL's `steps_per_generation=2` for the trainer's `mini_batches=2`), lr (grpo
3e-4, sppo 1e-4), AdamW eps, gradient clipping, sampling
temperature (top-k / top-p off), max completion length, beta 0, clip 0.2 (dual clip 3 for sppo), critic
size and lr, the critic warm-up (the policy's gradients dropped for the first 5 rollout batches), and the
held-out evaluation (`loop.evaluate`: 256 test prompts, sampled at temperature 1 from its own fixed seed).
What differs: TRL's loss aggregation per micro-batch (grpo: seq-mean-token-mean; sppo: bnpo = token-mean),
TRL recomputes the old log-probs by a forward pass, and SPPOTrainer updates its critic once per rollout.

Each run (variant x seed) is a child process (its own peak RSS), one after the other, with one torch
thread. The report (`report.md`, `report.json`, `accuracy_vs_time.png` in --out) puts trl and sppo_fast
side by side step by step (loss, entropy, clip ratio), gives their first-step relative loss difference per
seed, final accuracy mean +- std, peak memory and step time. A step's loss is the exact value
`compute_loss` returned (the Trainer's logged "loss" is the same number, averaged over the logging window);
entropy and clip ratio are TRL's logged metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from sppo_fast.trainer.compare import cpu_name, one_config
from sppo_fast.trainer.compare import mean_std as _mean_std
from sppo_fast.trainer.resident import reset_peak, status_kib

VARIANTS = ("trl", "sppo_fast", "sppo")
ALGO_OF = {"trl": "grpo", "sppo_fast": "grpo", "sppo": "sppo"}
LOSS_TYPE = {"grpo": "grpo", "sppo": "bnpo"}  # TRL's loss_type matching the trainer's preset aggregation
# Tiny sizes of the smoke test (`--tiny`): seconds per run.
TINY = dict(hidden_size=16, num_layers=1, num_heads=2, critic_hidden_size=16, critic_layers=1, critic_heads=2,
            warm_start=False, max_new_tokens=8, eval_examples=16, critic_warmup_steps=1)
MINI_BATCHES = 2
FIRST_STEP_TARGET = 1e-4


# ----------------------------------------------------------------------------------------------------
# One run


def train_config(variant, seed, overrides, prompts_per_step=32):
    """The TrainConfig `sppo-fast compare` gives this algorithm (docs/compare/: 32 prompts per step, 8 samples
    for grpo and 1 for sppo, grpo at the trainer's lr 3e-4, sppo at 1e-4, 256 held-out prompts), plus
    `overrides`."""
    return one_config(ALGO_OF[variant], seed, "unused", prompts_per_step=prompts_per_step,
                      common=dict(overrides, threads=1, progress=False, mini_batches=MINI_BATCHES))


def prepare_model_dir(cfg, model_dir, log=print, wait_s=3600):
    """The policy exactly as `sppo-fast train` builds it (same seed, same config, same warm-start cache
    file), written with save_pretrained next to its tokenizer. A warm start that another process is making
    right now (its `.partial` progress exists) is waited for, never made twice."""
    import torch

    from sppo_fast.trainer.loop import make_task, seed_everything
    from sppo_fast.trainer.models import build_policy, load_tokenizer

    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg)
    task = make_task(cfg)
    seed_everything(cfg.seed)
    lm = build_policy(cfg, tokenizer, device)
    if cfg.warm_start:
        from sppo_fast.trainer import warmstart

        path = warmstart.cache_path(cfg, lm, tokenizer)
        start = time.time()
        while (not os.path.exists(path) and os.path.exists(warmstart.partial_path(path))
               and time.time() - start < wait_s):
            log(f"warm start for seed {cfg.seed} is being made by another process ({path}); waiting")
            time.sleep(30)
        warmstart.warm_start(cfg, lm, tokenizer, task, device, log=log, progress=False)
    tmp = f"{model_dir}.tmp-{os.getpid()}"
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, model_dir)
    return model_dir


def load_local_model(model_dir):
    """The policy and tokenizer back from the local directory (offline), fp32, sdpa."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer


def prompt_dataset(task, cfg, steps):
    """The prompts of RL steps 1..steps in order, as `sppo-fast train` draws them (loop.step_examples)."""
    from datasets import Dataset

    from sppo_fast.trainer.loop import step_examples

    rows = [{"prompt": ex.prompt, "answer": ex.answer, "solution": ex.solution}
            for step in range(1, steps + 1) for ex in step_examples(task, cfg, step)]
    return Dataset.from_list(rows)


def reward_function(task, seen):
    """The task's verifier as a TRL reward function (parses the completion, never evaluates it). `seen`
    collects a fingerprint of each generation batch (its prompts and completion ids)."""
    from sppo_fast.trainer.tasks import Example, score_responses

    def task_reward(prompts, completions, completion_ids, answer, solution, **_):
        examples = [Example(p, a, s) for p, a, s in zip(prompts, answer, solution)]
        rewards, _counts = score_responses(task, list(completions), examples)
        digest = hashlib.sha256(json.dumps([list(prompts), [list(map(int, c)) for c in completion_ids]])
                                .encode()).hexdigest()[:16]
        seen.append({"prompts": sorted(set(prompts)), "completions": digest, "reward": sum(rewards) / len(rewards)})
        return rewards

    task_reward.__name__ = f"{task.name}_reward"
    return task_reward


def grpo_args(variant, cfg, out_dir, steps):
    common = dict(
        output_dir=out_dir, max_steps=steps * MINI_BATCHES, per_device_train_batch_size=cfg.rollouts_per_step
        // MINI_BATCHES, steps_per_generation=MINI_BATCHES, gradient_accumulation_steps=1,
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, adam_epsilon=cfg.adam_eps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, beta=0.0, temperature=cfg.temperature,
        top_k=0, top_p=1.0, max_completion_length=cfg.max_new_tokens, loss_type=LOSS_TYPE[cfg.algo],
        epsilon=0.2, shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to="none",
        seed=cfg.seed, use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0)
    if variant == "sppo":
        from sppo_fast.integrations.trl import sppo_config

        return sppo_config(**common, delta=3.0)  # the sppo preset's dual clip
    from trl import GRPOConfig

    return GRPOConfig(**common, num_generations=cfg.group_size)


def run_one(variant, seed, steps, overrides, model_root, out_dir, evals, prompts_per_step=32, log=print):
    """Train one variant on one seed; returns its record (per-step metrics, evaluations, times, memory)."""
    import torch

    torch.set_num_threads(1)
    from transformers import TrainerCallback

    from sppo_fast.trainer.distributed import Dist
    from sppo_fast.trainer.loop import evaluate, make_task, seed_everything

    cfg = train_config(variant, seed, overrides, prompts_per_step)
    eval_every = max(1, steps // evals)
    t_prep, c_prep = time.time(), time.process_time()
    model_dir = prepare_model_dir(cfg, os.path.join(model_root, f"seed{seed}"), log=log)
    prepare = {"prepare_seconds": time.time() - t_prep, "prepare_cpu_seconds": time.process_time() - c_prep}
    model, tokenizer = load_local_model(model_dir)
    task = make_task(cfg)
    dataset = prompt_dataset(task, cfg, steps)
    seen = []
    test_examples = task.examples("test", cfg.eval_examples, seed=cfg.seed + 1)
    args = grpo_args(variant, cfg, os.path.join(out_dir, f"{variant}-seed{seed}"), steps)
    kwargs = dict(model=model, reward_funcs=[reward_function(task, seen)], args=args, train_dataset=dataset,
                  processing_class=tokenizer)
    if variant == "trl":
        from trl import GRPOTrainer as Trainer
    elif variant == "sppo_fast":
        from sppo_fast.integrations.trl import SppoFastGRPOTrainer as Trainer
    else:
        from sppo_fast.integrations.trl import SPPOTrainer as Trainer
        from sppo_fast.trainer.models import build_critic

        seed_everything(cfg.seed)
        kwargs.update(critic=build_critic(cfg, tokenizer, torch.device("cpu")), critic_learning_rate=cfg.critic_lr)
    trainer = Trainer(**kwargs)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the report keeps the logs; no dict per step on stdout
    if variant == "sppo":
        for group in trainer.critic_optimizer.param_groups:
            group["eps"] = cfg.adam_eps  # the trainer's critic AdamW

    losses = []
    plain_compute_loss = trainer.compute_loss

    def compute_loss(*a, **kw):
        loss = plain_compute_loss(*a, **kw)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    trainer.compute_loss = compute_loss
    record = {"variant": variant, "seed": seed, "algo": cfg.algo, "loss_type": args.loss_type,
              "steps": steps, "optimizer_steps": steps * MINI_BATCHES, "rows": [], "evals": [], **prepare}
    clock = {"train": 0.0, "cpu": 0.0}

    def run_eval(step):
        t = time.time()
        acc = evaluate(trainer.model, tokenizer, task, test_examples, cfg, torch.device("cpu"), Dist())
        record["evals"].append({"rl_step": step, "accuracy": acc, "train_seconds": clock["train"],
                                "train_cpu_seconds": clock["cpu"], "eval_seconds": time.time() - t})
        log(f"[{variant} seed {seed}] RL step {step}: held-out accuracy {acc:.3f} "
            f"(train {clock['train']:.0f}s)")

    warmup = cfg.critic_warmup_steps * MINI_BATCHES if variant == "sppo" else 0

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.time(), time.process_time()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step < warmup:  # SPPO's critic warm-up: the policy waits
                for p in trainer.model.parameters():
                    p.grad = None

        def on_step_end(self, args, state, control, **kw):
            dt, dc = time.time() - self.t, time.process_time() - self.c
            clock["train"] += dt
            clock["cpu"] += dc
            record["rows"].append({"step": state.global_step, "step_seconds": dt, "step_cpu_seconds": dc,
                                   "loss": losses[-1] if losses else None})
            if state.global_step % MINI_BATCHES == 0:
                rl_step = state.global_step // MINI_BATCHES
                if rl_step % eval_every == 0 or rl_step == steps:
                    run_eval(rl_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and record["rows"] and record["rows"][-1]["step"] == state.global_step:
                row = record["rows"][-1]
                for key in ("entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                            "reward", "loss", "grad_norm", "completions/mean_length", "sppo/critic_loss"):
                    if key in logs:
                        row["logged_loss" if key == "loss" else key] = logs[key]

    trainer.add_callback(Recorder())
    run_eval(0)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_kib("VmRSS")
    reset_peak()
    t0, c0 = time.time(), time.process_time()
    trainer.train()
    record.update(
        wall_seconds=time.time() - t0, cpu_seconds=time.process_time() - c0, train_seconds=clock["train"],
        train_cpu_seconds=clock["cpu"], peak_rss_mib=status_kib("VmHWM") / 1024, base_rss_mib=base / 1024,
        median_step_seconds=statistics.median(r["step_seconds"] for r in record["rows"]),
        median_step_cpu_seconds=statistics.median(r["step_cpu_seconds"] for r in record["rows"]),
        generations=seen, final_accuracy=record["evals"][-1]["accuracy"],
        expected_prompts=[sorted({ex["prompt"] for ex in dataset.select(range(i, i + cfg.prompts_per_step))})
                          for i in range(0, len(dataset), cfg.prompts_per_step)])
    record["prompts_match_train"] = [g["prompts"] for g in seen] == record["expected_prompts"]
    del record["expected_prompts"]
    for g in seen:
        del g["prompts"]
    return record


# ----------------------------------------------------------------------------------------------------
# Several runs, one process each


def child_main(payload_path):
    with open(payload_path) as f:
        p = json.load(f)
    record = run_one(p["variant"], p["seed"], p["steps"], p["overrides"], p["model_root"], p["out"],
                     p["evals"], p["prompts_per_step"], log=lambda m: print(m, file=sys.stderr, flush=True))
    with open(p["result"], "w") as f:
        json.dump(record, f)
    return 0


def run_all(variants, seeds, steps, overrides, out, evals, prompts_per_step=32, in_process=False, log=print,
            timeout=3600, reuse=False):
    """`steps`: {variant: RL steps}. Each run's record is kept in OUT/records/ as soon as it ends; with
    `reuse`, a run whose record is there (same steps) is not run again."""
    model_root = os.path.join(out, "models")
    os.makedirs(model_root, exist_ok=True)
    os.makedirs(os.path.join(out, "records"), exist_ok=True)
    records = []
    for seed in seeds:
        for variant in variants:
            result = os.path.join(out, "records", f"{variant}-seed{seed}.json")
            if reuse and os.path.exists(result):
                with open(result) as f:
                    rec = json.load(f)
                if rec["steps"] == steps[variant] and rec.get("overrides") == overrides:
                    log(f"reusing {result}")
                    records.append(rec)
                    continue
            if in_process:
                rec = run_one(variant, seed, steps[variant], overrides, model_root, out, evals, prompts_per_step,
                              log=log)
            else:
                payload = result + ".payload"
                with open(payload, "w") as f:
                    json.dump(dict(variant=variant, seed=seed, steps=steps[variant], overrides=overrides,
                                   model_root=model_root, out=out, evals=evals, prompts_per_step=prompts_per_step,
                                   result=result + ".tmp"), f)
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
                log(f"run {variant} seed {seed} ({steps[variant]} RL steps)")
                t, c = time.time(), _children_cpu()
                proc = subprocess.run([sys.executable, "-m", "sppo_fast.trainer.trl_job", "--child", payload],
                                      env=env, timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"run {variant} seed {seed} failed (exit {proc.returncode})")
                with open(result + ".tmp") as f:
                    rec = json.load(f)
                rec["process_wall_seconds"], rec["process_cpu_seconds"] = time.time() - t, _children_cpu() - c
                os.remove(payload)
                os.remove(result + ".tmp")
            rec["overrides"] = overrides
            with open(result, "w") as f:
                json.dump(rec, f)
            records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------
# Report


def rel_diff(a, b):
    if a is None or b is None:
        return None
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def first_divergence(a, b):
    """The first RL step whose rollouts differ between two runs (None: identical throughout)."""
    for i, (x, y) in enumerate(zip(a["generations"], b["generations"])):
        if x["completions"] != y["completions"]:
            return i + 1
    return None


def mean_std(values):
    """compare.mean_std of the values there are; (None, None) when there are none (the report prints "-")."""
    values = [v for v in values if v is not None]
    return _mean_std(values) if values else (None, None)


def summarize(records, meta):
    by = {(r["variant"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    pairs = []
    for seed in seeds:
        a, b = by.get(("trl", seed)), by.get(("sppo_fast", seed))
        if a is None or b is None:
            continue
        rows = []
        for ra, rb in zip(a["rows"], b["rows"]):
            rows.append({"step": ra["step"], "loss_trl": ra["loss"], "loss_sppo_fast": rb["loss"],
                         "loss_rel_diff": rel_diff(ra["loss"], rb["loss"]),
                         "entropy_trl": ra.get("entropy"), "entropy_sppo_fast": rb.get("entropy"),
                         "clip_trl": ra.get("clip_ratio/region_mean"),
                         "clip_sppo_fast": rb.get("clip_ratio/region_mean"),
                         "reward_trl": ra.get("reward"), "reward_sppo_fast": rb.get("reward")})
        div = first_divergence(a, b)
        same = [r["loss_rel_diff"] for r in rows if r["loss_rel_diff"] is not None
                and (div is None or (r["step"] + MINI_BATCHES - 1) // MINI_BATCHES < div)]
        pairs.append({"seed": seed, "rows": rows, "first_step_loss_rel_diff": rows[0]["loss_rel_diff"],
                      "max_loss_rel_diff_same_rollouts": max(same) if same else None,
                      "first_step_entropy_rel_diff": rel_diff(rows[0]["entropy_trl"], rows[0]["entropy_sppo_fast"]),
                      "first_step_within_target": rows[0]["loss_rel_diff"] is not None
                      and rows[0]["loss_rel_diff"] <= FIRST_STEP_TARGET,
                      "rollouts_differ_from_rl_step": div})
    table = {}
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        acc0 = mean_std([r["evals"][0]["accuracy"] for r in rs])
        acc = mean_std([r["final_accuracy"] for r in rs])
        table[v] = {"runs": len(rs), "accuracy_before": acc0, "final_accuracy": acc,
                    "final_accuracy_per_seed": {r["seed"]: r["final_accuracy"] for r in rs},
                    "accuracy_before_per_seed": {r["seed"]: r["evals"][0]["accuracy"] for r in rs},
                    "gain": mean_std([r["final_accuracy"] - r["evals"][0]["accuracy"] for r in rs]),
                    "median_step_seconds": statistics.median(r["median_step_seconds"] for r in rs),
                    "rl_step_seconds": sum(r["train_seconds"] for r in rs) / sum(r["steps"] for r in rs),
                    "rl_step_cpu_seconds": sum(r["train_cpu_seconds"] for r in rs) / sum(r["steps"] for r in rs),
                    "median_step_cpu_seconds": statistics.median(r["median_step_cpu_seconds"] for r in rs),
                    "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                    "peak_rss_above_base_mib": max(r["peak_rss_mib"] - r["base_rss_mib"] for r in rs),
                    "train_seconds": sum(r["train_seconds"] for r in rs),
                    "train_cpu_seconds": sum(r["train_cpu_seconds"] for r in rs),
                    "prompts_match_train": all(r["prompts_match_train"] for r in rs)}
    return {"meta": meta, "summary": table, "trl_vs_sppo_fast": pairs, "runs": records}


def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def pm(pair, spec=".3f"):
    m, s = pair
    return "-" if m is None else f"{m:{spec}} ± {s:{spec}}"


def train_reference(path, seeds, steps):
    """`sppo-fast train`'s held-out accuracy (runs of a `sppo-fast compare`, its compare.json) for these seeds:
    per algo (grpo, sppo) and seed, before RL, at the RL step these runs stop at (`steps[algo]`, its RL
    seconds too) and at the compare run's own end."""
    if not path:
        return None
    with open(path) as f:
        data = json.load(f)
    out = {}
    for algo in ("grpo", "sppo"):
        rows = {}
        for r in data.get("runs", []):
            if r.get("algo") != algo or r.get("seed") not in seeds or r.get("status") != "ok":
                continue
            curve = r.get("curve") or []
            at = [c for c in curve if c["step"] <= steps[algo]]
            rows[r["seed"]] = {"before": curve[0]["accuracy"] if curve else None,
                               "at_step": at[-1]["step"] if at else None,
                               "accuracy_at_step": at[-1]["accuracy"] if at else None,
                               "rl_seconds_at_step": at[-1].get("rl_seconds") if at else None,
                               "rl_cpu_seconds_at_step": at[-1].get("rl_cpu_seconds") if at else None,
                               "final_step": r["summary"].get("steps"),
                               "final_accuracy": r["summary"].get("eval_accuracy_after"),
                               "curve": at}
        if rows:
            out[algo] = {"per_seed": rows,
                         "accuracy_at_step": mean_std([v["accuracy_at_step"] for v in rows.values()]),
                         "final_accuracy": mean_std([v["final_accuracy"] for v in rows.values()]),
                         "rl_cpu_seconds_at_step": mean_std([v["rl_cpu_seconds_at_step"] for v in rows.values()])}
    return out


def write_report(report, out):
    meta, table, pairs = report["meta"], report["summary"], report["trl_vs_sppo_fast"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot = plot_accuracy(report["runs"], os.path.join(out, "accuracy_vs_time.png"), meta.get("train_reference"))
    lines = ["# Through TRL: the same job with trl.GRPOTrainer, SppoFastGRPOTrainer and SPPOTrainer", "",
             "```", meta["command"], "```", "",
             f"Machine: {meta['cpu']}, {meta['cores']} cores, 1 torch thread per run, runs one after the other. "
             f"{meta['note']}", "",
             f"TRL {meta['versions']['trl']}, transformers {meta['versions']['transformers']}, torch "
             f"{meta['versions']['torch']}. RL steps per run: "
             + ", ".join(f"{v} {n}" for v, n in meta["steps"].items() if v in meta["variants"])
             + f"; {meta['prompts_per_step']} prompts per RL step (8 samples each for trl and sppo_fast, 1 for "
             f"sppo), {MINI_BATCHES} optimizer steps per RL step; seeds {', '.join(map(str, meta['seeds']))}. "
             f"Held-out accuracy is `sppo-fast train`'s evaluation (`loop.evaluate`: {meta['eval_examples']} test "
             f"prompts, sampled at temperature 1, its own fixed seed) before RL and {meta['evals']} times during "
             "it. Step times and the time axis of the plot exclude the evaluations. "
             f"The runs' processes took {meta['total_run_wall_seconds']:.0f} s wall-clock and "
             f"{meta['total_cpu_seconds']:.0f} s CPU in all, of which {meta['prepare_cpu_seconds']:.0f} s CPU "
             "made or loaded the warm starts (made here when not cached) and the rest is the imports, the "
             "evaluations and the RL steps. With `--reuse`, the runs recorded in `records/` are read back, "
             "not run again.", "",
             "## Summary", "",
             "| variant | runs | accuracy before | final accuracy (mean ± std) | per seed | gain | median "
             "optimizer step s (wall / CPU) | mean RL step s (wall / CPU) | peak RSS MiB (above base) | "
             "train s (wall / CPU, all seeds) | prompts = train's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, t in table.items():
        per = ", ".join(f"{s}: {a:.3f}" for s, a in t["final_accuracy_per_seed"].items())
        lines.append(f"| {v} | {t['runs']} | {pm(t['accuracy_before'])} | {pm(t['final_accuracy'])} | {per} | "
                     f"{pm(t['gain'])} | "
                     f"{t['median_step_seconds']:.2f} / {t['median_step_cpu_seconds']:.2f} | "
                     f"{t['rl_step_seconds']:.2f} / {t['rl_step_cpu_seconds']:.2f} | "
                     f"{t['peak_rss_mib']:.0f} ({t['peak_rss_above_base_mib']:.0f}) | "
                     f"{t['train_seconds']:.0f} / {t['train_cpu_seconds']:.0f} | {t['prompts_match_train']} |")
    ref = meta.get("train_reference")
    lines += [""]
    if ref:
        mine = next(iter(table.values()))["accuracy_before_per_seed"]
        theirs = {s_: row["before"] for v in ref.values() for s_, row in v["per_seed"].items()}
        same = all(theirs.get(s_) == a for s_, a in mine.items())
        lines += [f"`sppo-fast train` on the same seeds (`sppo-fast compare` runs, {meta['train_results']}), read "
                  "at the same RL step. " + (
                      "Same warm starts: the accuracy before RL is the same, seed by seed." if same else
                      "NOT the same warm starts: the accuracy before RL differs (these runs: " + ", ".join(
                          f"{s_}: {a:.3f}" for s_, a in mine.items()) + "), so those runs started from another "
                      "warm-start recipe; compare gains, not levels."), "",
                  "| algo (through TRL as) | accuracy before, per seed | accuracy at the step, per seed | mean ± std "
                  "| gain | RL CPU s to that step (mean) | at the compare's own end |", "|---|---|---|---|---|---|---|"]
        for algo, v in ref.items():
            per = v["per_seed"]
            seeds_ = sorted(per)
            step = per[seeds_[0]]["at_step"]
            lines.append(
                f"| {algo} ({'trl, sppo_fast' if algo == 'grpo' else 'sppo'}) | "
                + ", ".join(f"{s_}: {fmt(per[s_]['before'], '.3f')}" for s_ in seeds_) + " | "
                + ", ".join(f"{s_}: {fmt(per[s_]['accuracy_at_step'], '.3f')}" for s_ in seeds_)
                + f" (step {step}) | {pm(v['accuracy_at_step'])} | "
                f"{pm(mean_std([per[s_]['accuracy_at_step'] - per[s_]['before'] for s_ in seeds_]))} | "
                f"{fmt(v['rl_cpu_seconds_at_step'][0], '.0f')} | "
                f"{pm(v['final_accuracy'])} (step {per[seeds_[0]]['final_step']}) |")
    else:
        lines.append("The `sppo-fast train` runs of the same job are in `docs/compare/` (compare.md).")
    lines += ["", "## First step: trl vs sppo_fast (same rollouts, same parameters)", "",
              f"Target: relative loss difference <= {FIRST_STEP_TARGET:g}.", "",
              "| seed | loss trl | loss sppo_fast | rel. diff | entropy rel. diff | within target | rollouts differ "
              "from RL step | max loss rel. diff while the rollouts are the same |",
              "|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        r = p["rows"][0]
        lines.append(f"| {p['seed']} | {fmt(r['loss_trl'], '.8g')} | {fmt(r['loss_sppo_fast'], '.8g')} | "
                     f"{fmt(p['first_step_loss_rel_diff'], '.2e')} | {fmt(p['first_step_entropy_rel_diff'], '.2e')} | "
                     f"{p['first_step_within_target']} | {p['rollouts_differ_from_rl_step'] or 'never'} | "
                     f"{fmt(p['max_loss_rel_diff_same_rollouts'], '.2e')} |")
    lines += ["", "Once the rollouts differ (the two losses round differently, so the parameters drift apart "
              "by rounding and a sampled token eventually flips) the rows are two runs of the same job, no longer "
              "the same computation.", ""]
    for p in pairs:
        lines += [f"### seed {p['seed']}: per optimizer step", "",
                  "| step | loss trl | loss sppo_fast | rel. diff | entropy trl | entropy sppo_fast | clip trl | "
                  "clip sppo_fast | reward trl | reward sppo_fast |", "|---|---|---|---|---|---|---|---|---|---|"]
        div = p["rollouts_differ_from_rl_step"]
        for r in p["rows"]:
            mark = " *" if div is not None and (r["step"] + MINI_BATCHES - 1) // MINI_BATCHES >= div else ""
            lines.append(f"| {r['step']}{mark} | {fmt(r['loss_trl'], '.6f')} | {fmt(r['loss_sppo_fast'], '.6f')} | "
                         f"{fmt(r['loss_rel_diff'], '.1e')} | {fmt(r['entropy_trl'])} | "
                         f"{fmt(r['entropy_sppo_fast'])} | "
                         f"{fmt(r['clip_trl'])} | {fmt(r['clip_sppo_fast'])} | {fmt(r['reward_trl'], '.3f')} | "
                         f"{fmt(r['reward_sppo_fast'], '.3f')} |")
        lines += ["", "(* rollouts no longer identical)" if div else "(rollouts identical at every step)", ""]
    lines += ["## Accuracy against training time", "", f"![accuracy vs time]({os.path.basename(plot)})", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["report.md", "report.json", os.path.basename(plot)]


def plot_accuracy(records, path, reference=None):
    """Held-out accuracy against training seconds (evaluations excluded), one line per run, the plots.py
    style; `reference` (train_reference's): `sppo-fast train`'s curves of the same seeds, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, v in enumerate(VARIANTS):
        color = f"C{i}"
        first = True
        for r in records:
            if r["variant"] != v:
                continue
            for ax, x in zip(axes, ("train_seconds", "train_cpu_seconds")):
                ax.plot([e[x] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], marker="o", markersize=3,
                        color=color, alpha=0.8, label=v if first else None)
            first = False
    for j, (algo, v) in enumerate((reference or {}).items()):
        first = True
        for row in v["per_seed"].values():
            for ax, x in zip(axes, ("rl_seconds", "rl_cpu_seconds")):
                ax.plot([c[x] for c in row["curve"]], [c["accuracy"] for c in row["curve"]], linestyle="--",
                        marker="s", markersize=3, color=f"C{3 + j}", alpha=0.8,
                        label=f"sppo-fast train {algo} (compare.json)" if first else None)
            first = False
    axes[0].set_xlabel("training wall-clock seconds (evaluations excluded)")
    axes[1].set_xlabel("training CPU seconds")
    for ax in axes:
        ax.set_ylabel("held-out accuracy (sampled)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("held-out accuracy through TRL (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# CLI


def parser():
    p = argparse.ArgumentParser(
        prog="sppo-fast trl-job",
        description="Run the bundled job (task, tiny policy, tokenizer, warm start, reward of `sppo-fast train`) "
                    "through TRL 1.16: trl.GRPOTrainer (trl), sppo_fast's SppoFastGRPOTrainer (sppo_fast: the "
                    "same GRPO loss computed by sppo-fast) and SPPOTrainer (sppo: one sample per prompt, a "
                    "prompt critic). The policy is warm-started from the trainer's cache, saved as a local "
                    "Hugging Face model directory and loaded from it. Each run is a child process with one "
                    "torch thread, one after the other. Writes report.md, report.json and accuracy_vs_time.png "
                    "to --out: trl vs sppo_fast step by step (loss, entropy, clip ratio), their first-step "
                    "relative loss difference per seed (target 1e-4), final held-out accuracy mean ± std, peak "
                    "RSS and median step time.")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0", help="comma-separated seeds (each uses the warm start of its seed)")
    p.add_argument("--steps", type=int, default=40, help="RL steps (rollout batches) of the group variants (trl, "
                                                         "sppo_fast); each is two optimizer steps, as the "
                                                         "trainer's mini_batches=2")
    p.add_argument("--sppo-steps", type=int, default=None, help="RL steps of sppo (default 3 x --steps, as "
                                                                "docs/compare/ ran 300 against 100)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per RL step (default 32 as "
                                                                      "`sppo-fast compare`, 2 with --tiny)")
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations per run besides the one before "
                                                        "RL (every steps/evals RL steps, and at the end)")
    p.add_argument("--out", default="trl-job", help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field for every run (e.g. --set eval_examples=256)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, no warm start (the smoke test's)")
    p.add_argument("--train-results", default=None, metavar="COMPARE_JSON",
                   help="a `sppo-fast compare` compare.json to quote `sppo-fast train`'s accuracy for the same "
                        "seeds (grpo, sppo) in the report")
    p.add_argument("--in-process", action="store_true", help="run everything in this process (no separate "
                                                             "peak memory per run; for tests)")
    p.add_argument("--reuse", action="store_true", help="keep the runs already recorded in OUT/records/ (same "
                                                        "steps and settings) and run only the others")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def parse_overrides(items, tiny):
    from sppo_fast.trainer.config import coerce_field

    overrides = dict(TINY) if tiny else {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"sppo-fast trl-job: --set takes FIELD=VALUE, got {item!r}")
        overrides[key] = coerce_field(key, value)
    return overrides


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"sppo-fast trl-job: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    overrides = parse_overrides(args.set, args.tiny)
    prompts = args.prompts_per_step or (2 if args.tiny else 32)
    steps = {"trl": args.steps, "sppo_fast": args.steps, "sppo": args.sppo_steps or 3 * args.steps}
    t0 = time.time()
    records = run_all(variants, seeds, steps, overrides, args.out, args.evals, prompts, in_process=args.in_process,
                      reuse=args.reuse)
    import torch
    import transformers
    import trl

    cpu, cores = cpu_name(), os.cpu_count()
    cfg = train_config(variants[0], seeds[0], overrides, prompts)
    meta = {"command": "sppo-fast trl-job " + shlex.join(argv), "cpu": cpu, "cores": cores, "note": args.note,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
            "steps": steps, "seeds": seeds, "prompts_per_step": prompts, "variants": variants, "overrides": overrides,
            "rollouts_per_step": cfg.rollouts_per_step, "eval_examples": cfg.eval_examples,
            "evals": args.evals, "total_wall_seconds": time.time() - t0,
            "total_cpu_seconds": sum(r.get("process_cpu_seconds", r["cpu_seconds"]) for r in records),
            "total_run_wall_seconds": sum(r.get("process_wall_seconds", r["wall_seconds"]) for r in records),
            "prepare_cpu_seconds": sum(r.get("prepare_cpu_seconds", 0.0) for r in records),
            "train_results": args.train_results,
            "train_reference": train_reference(args.train_results, seeds,
                                                 {"grpo": steps["trl"], "sppo": steps["sppo"]})}
    report = summarize(records, meta)
    written = write_report(report, args.out)
    print("wrote " + ", ".join(os.path.join(args.out, w) for w in written))
    for p in report["trl_vs_sppo_fast"]:
        print(f"seed {p['seed']}: first-step loss rel. diff {fmt(p['first_step_loss_rel_diff'], '.2e')} "
              f"(target {FIRST_STEP_TARGET:g})")
    return 0


def _children_cpu():
    t = os.times()
    return t.children_user + t.children_system


if __name__ == "__main__":
    sys.exit(main())
