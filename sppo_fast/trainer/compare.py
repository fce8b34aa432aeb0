"""`sppo-fast compare`: algorithms x seeds of `sppo-fast train`, each run in its own process, then one
table (`compare.md`, `compare.json`) and one plot (`accuracy_vs_time.png`: held-out accuracy against
RL wall-clock, a mean line and a +-1 std band per algorithm).

Every algorithm sees the same prompts per step; a group algorithm samples `samples_per_prompt` answers
to each, so its step costs that many times more rollouts. Each algorithm keeps its own hyper-parameters
(`ALGO_SETTINGS`, documented there); `--set key=value` changes one for every algorithm and
`--set algo.key=value` for one algorithm only.

Time axis: the sum of the RL steps' own wall-clock (`step_time`), so that neither the warm start (made
once per seed before the runs, shared by every algorithm) nor the held-out evaluations count; or, with
`--time cpu`, the sum of the steps' CPU time in their process (`step_cpu_time`), which on a machine shared
with other jobs counts each run's own work only (every run uses one thread, so on an idle machine the two
agree).

Equal tuning (`--sweep KEY=V1,V2,...`, repeatable): every algorithm first runs the same grid (the product
of the sweeps) on the tuning seeds (`--tune-seeds`); each algorithm's best setting by final held-out
accuracy (mean over the tuning seeds; ties: the faster in RL time) is then run on the fresh `--seeds`, which
must take no part in tuning. A clip-range sweep (clip_low, clip_high) applies to the algorithms whose clip
range is on the token scale (around 0.2); GSPO's sequence-level range (3e-4 / 4e-4) is skipped, and said so,
unless swept for it alone (`--sweep gspo.clip_high=...`). Likewise a critic's settings are skipped for the
algorithms without one. The tuning runs live in OUT/tune/runs/, the fresh ones in OUT/runs/; `--reuse`
keeps the finished runs of both.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from sppo_fast.trainer.config import (
    ALGORITHMS,
    ALGOS,
    GROUP_ALGOS,
    TrainConfig,
    UserError,
    coerce_field,
    field_types,
)

DEFAULT_ALGOS = ("sppo", "grpo")
DEFAULT_SEEDS = (0, 1, 2)
# Tuning seeds of a sweep: apart from the fresh seeds' default range, so that the defaults never overlap.
DEFAULT_TUNE_SEEDS = (100,)
DEFAULT_PROMPTS_PER_STEP = 32

# Hyper-parameters per algorithm, on top of the `sppo-fast train` defaults (lr, clipping, mini-batches,
# warm start: the same for every algorithm unless set here or with --set).
# SPPO: one sample per prompt; its advantage R - V comes from the prompt critic (trained alongside).
#   lr 1e-4: at 32 prompts per step (16 rollouts per mini-batch) the trainer's 3e-4, tuned for 256
#   prompts per step, drove held-out accuracy from 70% to 50% on three seeds (docs/compare/).
# Group algorithms: 8 samples per prompt; the group's own mean (GRPO, DAPO: and std) is the baseline.
#   Their steps cost 8x the rollouts of SPPO's and their gradients are less noisy, which is their side of
#   the trade; they keep the preset's clipping and aggregation (docs/api.md §4).
# PPO (and its ppo_bce ablation): one sample per prompt and a token critic.
# ReMax: one sample per prompt plus one greedy response (its baseline), so 2x SPPO's decodes per prompt.
ALGO_SETTINGS: dict[str, dict] = {
    **{algo: {"samples_per_prompt": 1, "eval_every": 20} for algo in ALGOS if algo not in GROUP_ALGOS},
    "sppo": {"samples_per_prompt": 1, "eval_every": 20, "lr": 1e-4},
    **{algo: {"samples_per_prompt": 8, "eval_every": 10} for algo in GROUP_ALGOS},
}
# Shared by every run of a comparison. Evaluations often enough in time for a curve (a one-sample step is
# several times cheaper than an 8-sample one, hence the two eval_every above), on 256 held-out prompts.
COMMON_SETTINGS = {"eval_examples": 256, "progress": False, "threads": 1, "save_every": 0}


def default_jobs() -> int:
    """One process per core this process may use (each run uses one torch thread)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _scoped_item(flag, item, shape, fixed, why):
    """(algo or "", field name, value text) of a `--set`/`--sweep` item `[algo.]key=...`; a ValueError names
    the flag when the item has no `=`, names an unknown algorithm, or a field outside `sppo-fast train`'s
    table or among `fixed` (`why` says why those)."""
    if "=" not in item:
        raise ValueError(f"{flag}: expected {shape} or algo.{shape}, got {item!r}")
    key, text = item.split("=", 1)
    algo, _, name = key.rpartition(".")
    if algo and algo not in ALGOS:
        raise ValueError(f"{flag} {item}: unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if name not in field_types() or name in fixed:
        raise ValueError(f"{flag} {item}: {name!r} {why}")
    return algo, name, text


def parse_overrides(items: list[str]) -> tuple[dict, dict[str, dict]]:
    """`key=value` (every algorithm) and `algo.key=value` (one), values typed by the config's fields."""
    common, per_algo = {}, {}
    for item in items:
        algo, name, text = _scoped_item("--set", item, "key=value", ("algo", "seed", "out"),
                                        "is not a settable field of `sppo-fast train`")
        try:
            value = coerce_field(name, text)  # the table of `sppo-fast train`: same types, ranges, messages
        except ValueError as error:
            raise UserError(f"--set {item}: {error}") from None
        (per_algo.setdefault(algo, {}) if algo else common)[name] = value
    return common, per_algo


def run_configs(algos, seeds, out_dir, *, steps=None, prompts_per_step=DEFAULT_PROMPTS_PER_STEP,
                common=None, per_algo=None) -> list[TrainConfig]:
    """One validated TrainConfig per (seed, algorithm), seeds outermost so that runs of the same seed
    run side by side. Raises ValueError before anything runs."""
    algos, seeds = list(algos), list(seeds)
    if not algos:
        raise ValueError("algos: give at least one algorithm")
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise ValueError(f"algos: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(ALGOS)}")
    if len(set(algos)) != len(algos):
        raise ValueError(f"algos: each algorithm once, got {algos}")
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: each seed once, got {seeds}")
    if not isinstance(prompts_per_step, int) or prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be an int >= 1, got {prompts_per_step!r}")
    configs = []
    for seed in seeds:
        for algo in algos:
            configs.append(one_config(algo, seed, os.path.join(out_dir, "runs", f"{algo}-seed{seed}"), steps=steps,
                                      prompts_per_step=prompts_per_step, common=common, per_algo=per_algo))
    return configs


def one_config(algo, seed, out, *, steps=None, prompts_per_step=DEFAULT_PROMPTS_PER_STEP, common=None,
               per_algo=None, setting=None, what="") -> TrainConfig:
    """The validated TrainConfig of one run: the comparison's settings < the algorithm's (ALGO_SETTINGS) <
    --steps < --set < --set ALGO. < a sweep's `setting`."""
    values = {**COMMON_SETTINGS, **ALGO_SETTINGS[algo], **({"steps": steps} if steps is not None else {}),
              **(common or {}), **(per_algo or {}).get(algo, {}), **(setting or {})}
    group = values.get("samples_per_prompt") or (8 if algo in GROUP_ALGOS else 1)
    values.update(algo=algo, seed=seed, rollouts_per_step=prompts_per_step * group, out=out)
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{algo}{what} seed {seed}: {error}") from None


# --- equal tuning (--sweep) ------------------------------------------------------------------------

CLIP_KEYS = ("clip_low", "clip_high")
CRITIC_KEYS = ("critic_lr", "critic_hidden_size", "critic_layers", "critic_heads", "critic_warmup_steps")
GAE_KEYS = ("gamma", "lam")


def parse_sweeps(items: list[str]) -> tuple[dict[str, list], dict[str, dict[str, list]]]:
    """`key=v1,v2,...` (every algorithm) and `algo.key=v1,...` (one), each value typed and checked like
    `--set`'s. Returns ({key: values}, {algo: {key: values}}) in the order given."""
    common, per_algo = {}, {}
    for item in items:
        algo, name, text = _scoped_item(
            "--sweep", item, "key=v1,v2,...", ("algo", "seed", "out", "steps", "samples_per_prompt",
                                               "rollouts_per_step"),
            "is not a field a sweep may vary (seeds, steps and the samples per prompt are the comparison's own)")
        key = item.split("=", 1)[0]
        texts = [t.strip() for t in text.split(",") if t.strip()]
        if not texts:
            raise ValueError(f"--sweep {item}: give at least one value")
        try:
            values = [coerce_field(name, t) for t in texts]
        except ValueError as error:
            raise UserError(f"--sweep {item}: {error}") from None
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"--sweep {item}: each value once, got {texts}")
        scope = per_algo.setdefault(algo, {}) if algo else common
        if name in scope:
            raise ValueError(f"--sweep {item}: {key} is swept twice; give all its values in one --sweep")
        scope[name] = values
    return common, per_algo


def sweep_skip_reason(algo: str, key: str, *, for_this_algo: bool = False) -> str | None:
    """Why a swept `key` does not apply to `algo` (None: it does)."""
    spec = ALGORITHMS[algo]
    if key in CLIP_KEYS:
        if spec.clip is None:
            return "has no clip range"
        if spec.clip != "token" and not for_this_algo:
            return (f"has a {spec.clip}-level clip range on another scale (its preset's); sweep it for it alone "
                    f"with `--sweep {algo}.{key}=V1,V2`")
    if key in CRITIC_KEYS and spec.critic is None:
        return "has no critic"
    if key in GAE_KEYS and spec.critic != "token":
        return "does not use GAE"
    return None


def sweep_grid(algo: str, common: dict[str, list], per_algo: dict[str, dict[str, list]]
               ) -> tuple[list[dict], list[str]]:
    """The settings `algo` is tuned over (the product of the sweeps that apply to it, in the order given;
    one empty setting when none does) and a note for each sweep skipped."""
    keys, skipped = {}, []
    for key, values in common.items():
        reason = sweep_skip_reason(algo, key)
        if reason:
            skipped.append(f"{key}: {algo} {reason}")
        else:
            keys[key] = values
    for key, values in per_algo.get(algo, {}).items():
        reason = sweep_skip_reason(algo, key, for_this_algo=True)
        if reason:
            raise ValueError(f"--sweep {algo}.{key}: {algo} {reason}")
        keys[key] = values  # the algorithm's own sweep replaces the common one
        skipped = [note for note in skipped if not note.startswith(f"{key}:")]
    names = list(keys)
    return [dict(zip(names, combo)) for combo in itertools.product(*(keys[k] for k in names))], skipped


def setting_label(setting: dict) -> str:
    """`lr=0.0001, clip_high=0.28` ("defaults" for the empty setting)."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "defaults"


def setting_slug(setting: dict) -> str:
    """A directory name for a setting: `lr1e-04_clip_high0.28`."""
    parts = [f"{k}{format(v, '.3g') if isinstance(v, float) else v}" for k, v in setting.items()]
    text = "_".join(parts) or "defaults"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def check_seeds_apart(seeds, tune_seeds):
    if not tune_seeds:
        raise ValueError("tune_seeds: give at least one tuning seed")
    if len(set(tune_seeds)) != len(tune_seeds):
        raise ValueError(f"tune_seeds: each seed once, got {list(tune_seeds)}")
    both = sorted(set(seeds) & set(tune_seeds))
    if both:
        raise ValueError(f"seeds: {', '.join(map(str, both))} also tune the settings (--tune-seeds "
                         f"{','.join(map(str, tune_seeds))}); the fresh seeds must take no part in tuning: give "
                         "--seeds and --tune-seeds apart")


def tuning_configs(algos, tune_seeds, out_dir, grids, *, steps=None, prompts_per_step=DEFAULT_PROMPTS_PER_STEP,
                   common=None, per_algo=None) -> tuple[list[TrainConfig], dict[str, dict]]:
    """The tuning runs (seeds outermost, then algorithms, then settings) in OUT/tune/runs/, and the setting of
    each run directory."""
    configs, setting_of = [], {}
    for seed in tune_seeds:
        for algo in algos:
            for setting in grids[algo]:
                out = os.path.join(out_dir, "tune", "runs", f"{algo}-{setting_slug(setting)}-seed{seed}")
                configs.append(one_config(algo, seed, out, steps=steps, prompts_per_step=prompts_per_step,
                                          common=common, per_algo=per_algo, setting=setting,
                                          what=f" ({setting_label(setting)})"))
                setting_of[out] = setting
    return configs, setting_of


def choose_best(records: list[dict], algos: list[str], grids: dict[str, list[dict]],
                time_key: str = "rl_seconds") -> dict[str, dict]:
    """Per algorithm, its settings ranked by final held-out accuracy (mean over the tuning seeds), ties (equal
    to 1e-9) broken by the lower mean RL time, then by the grid's order. A setting ranks only when every one
    of its tuning runs finished. Each record carries its "setting". Returns {algo: {"best", "best_accuracy",
    "runner_up", "margin" (best - runner-up accuracy, None alone), "settings": [...] (best first; failed
    ones last)}}; "best" is None when no setting finished."""
    out = {}
    for algo in algos:
        rows = []
        for index, setting in enumerate(grids[algo]):
            runs = [r for r in records if r["algo"] == algo and r.get("setting") == setting]
            ok = [r for r in runs if r["status"] == "ok"]
            complete = bool(runs) and len(ok) == len(runs)
            finals = [r["summary"]["eval_accuracy_after"] for r in ok]
            times = [r["curve"][-1][time_key] for r in ok if r.get("curve")]
            rows.append({"setting": setting, "label": setting_label(setting), "index": index,
                         "runs": len(ok), "failed": len(runs) - len(ok), "complete": complete,
                         "final_accuracy": mean_std(finals), "accuracy_before": mean_std(
                             [r["summary"]["eval_accuracy_before"] for r in ok]),
                         time_key: mean_std(times), "seeds": [r["seed"] for r in ok],
                         "errors": [r.get("error") for r in runs if r["status"] != "ok"]})
        ranked = sorted((r for r in rows if r["complete"]), key=functools.cmp_to_key(
            lambda a, b: _rank(a, b, time_key)))
        failed = [r for r in rows if not r["complete"]]
        for r in ranked:
            r["behind_best"] = ranked[0]["final_accuracy"][0] - r["final_accuracy"][0]
        best = ranked[0] if ranked else None
        out[algo] = {
            "best": best["setting"] if best else None, "best_label": best["label"] if best else None,
            "best_accuracy": best["final_accuracy"][0] if best else None,
            "runner_up": ranked[1]["setting"] if len(ranked) > 1 else None,
            "runner_up_label": ranked[1]["label"] if len(ranked) > 1 else None,
            "margin": (best["final_accuracy"][0] - ranked[1]["final_accuracy"][0]) if len(ranked) > 1 else None,
            "time_key": time_key, "settings": ranked + failed,
        }
    return out


def _rank(a: dict, b: dict, time_key: str) -> int:
    acc_a, acc_b = a["final_accuracy"][0], b["final_accuracy"][0]
    if abs(acc_a - acc_b) > 1e-9:
        return -1 if acc_a > acc_b else 1
    ta, tb = a[time_key][0], b[time_key][0]
    ta, tb = (math.inf if math.isnan(ta) else ta), (math.inf if math.isnan(tb) else tb)
    if ta != tb:
        return -1 if ta < tb else 1
    return a["index"] - b["index"]


_LIVE: set = set()  # runs in flight, stopped by `_stop_live` if the comparison itself is interrupted


def _stop_live():
    for proc in list(_LIVE):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _launch(args: list[str], log_path: str) -> tuple[int, str]:
    """Run `python args...` with its output in `log_path`; (exit code, last lines of the output). The run
    gets its own session, so that when the comparison is interrupted (or fails) the whole run, with any
    process it started, is stopped rather than left behind."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _LIVE.add(proc)
        try:
            rc = proc.wait()
        finally:
            _LIVE.discard(proc)
    with open(log_path, errors="replace") as log:
        tail = log.read()[-4000:]
    return rc, tail


def last_error(log_tail: str) -> str:
    """The exception line of a traceback (or the last line of the output)."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or line.startswith("sppo-fast"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def run_one(cfg: TrainConfig) -> dict:
    """Train one configuration in a fresh process; never raises for the run's own failure."""
    os.makedirs(cfg.out, exist_ok=True)
    if os.path.exists(os.path.join(cfg.out, DONE_MARKER)):
        os.remove(os.path.join(cfg.out, DONE_MARKER))  # finished again below, or not at all
    config_path = os.path.join(cfg.out, "compare-config.json")
    with open(config_path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    start = time.time()
    # --overwrite: `compare` itself refuses an --out that holds a comparison unless --reuse or --overwrite
    # said which of its runs may be replaced (those it trains again).
    rc, tail = _launch(["-m", "sppo_fast.trainer.cli", "--config", config_path, "--overwrite"],
                       os.path.join(cfg.out, "train.log"))
    record = {"algo": cfg.algo, "seed": cfg.seed, "run_dir": cfg.out, "returncode": rc,
              "process_seconds": time.time() - start}
    summary_path = os.path.join(cfg.out, "summary.json")
    if rc != 0 or not os.path.exists(summary_path):
        record.update(status="failed", error=last_error(tail) if rc != 0 else "no summary.json written")
        return record
    with open(os.path.join(cfg.out, DONE_MARKER), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    return finished_record(cfg, record)


DONE_MARKER = "compare-done.json"  # the config of a run that finished, for --reuse


def finished_record(cfg: TrainConfig, record: dict | None = None) -> dict:
    """The record of the finished run in `cfg.out`."""
    record = record or {"algo": cfg.algo, "seed": cfg.seed, "run_dir": cfg.out, "returncode": 0, "reused": True}
    with open(os.path.join(cfg.out, "summary.json")) as f:
        record["summary"] = json.load(f)
    record["curve"] = accuracy_curve(cfg.out)
    record["trace"] = step_trace(cfg.out)
    record["status"] = "ok"
    return record


def already_finished(cfg: TrainConfig) -> bool:
    """Whether `cfg.out` holds a finished run of exactly this configuration (compare --reuse)."""
    try:
        with open(os.path.join(cfg.out, DONE_MARKER)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    return done == json.loads(json.dumps(cfg.to_dict())) and os.path.exists(os.path.join(cfg.out, "summary.json"))


TIME_KEYS = {"wall": "rl_seconds", "cpu": "rl_cpu_seconds"}


def accuracy_curve(run_dir: str) -> list[dict]:
    """(step, RL seconds, RL CPU seconds, held-out accuracy) at every evaluation; the seconds sum the
    steps' own wall-clock and CPU time."""
    from sppo_fast.trainer.plots import read_metrics

    points, seconds, cpu = [], 0.0, 0.0
    for row in read_metrics(run_dir):
        seconds += row.get("step_time") or 0.0
        cpu += row.get("step_cpu_time") or 0.0
        if row.get("eval_accuracy") is not None:
            points.append({"step": row["step"], "rl_seconds": seconds, "rl_cpu_seconds": cpu,
                           "accuracy": row["eval_accuracy"]})
    return points


# Per-step signals kept in compare.json for every run (plots of clipping and entropy over training).
TRACE_KEYS = ("reward", "entropy", "clipfrac", "dual_clipfrac", "approx_kl", "response_length", "truncated_frac",
              "greedy_reward", "critic_loss", "critic_explained_variance", "loss", "grad_norm", "step_time",
              "step_cpu_time")


def step_trace(run_dir: str) -> dict[str, list]:
    """The RL steps' signals of metrics.jsonl as columns: {"step": [1, 2, ...], "entropy": [...], ...}; a key
    none of the steps has is left out, a step without it (a critic warm-up step has no policy update, so no
    entropy or clip fraction) holds None."""
    from sppo_fast.trainer.plots import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) >= 1 and "step_time" in r]
    trace = {"step": [r["step"] for r in rows]}
    for key in TRACE_KEYS:
        if any(r.get(key) is not None for r in rows):
            trace[key] = [r.get(key) for r in rows]
    return trace


def prepare_warm_starts(configs: list[TrainConfig], jobs: int, out_dir: str, log=print) -> dict[int, str]:
    """Make each seed's warm start (cached) once, before the runs, so that two algorithms of one seed do
    not fine-tune the same model side by side. Returns the error of each seed whose warm start failed."""
    by_seed = {}
    for cfg in configs:
        if cfg.warm_start:
            by_seed.setdefault(cfg.seed, cfg)
    os.makedirs(os.path.join(out_dir, "warmstart-logs"), exist_ok=True)

    def one(cfg):
        path = os.path.join(out_dir, "warmstart-logs", f"seed{cfg.seed}.json")
        with open(path, "w") as f:
            json.dump(cfg.to_dict(), f)
        rc, tail = _launch(["-m", "sppo_fast.trainer.compare", "--warm-start-only", path], path + ".log")
        return cfg.seed, (None if rc == 0 else last_error(tail))

    failed = {}
    if by_seed:
        log(f"compare: warm starts for seeds {sorted(by_seed)}")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for seed, error in pool.map(one, by_seed.values()):
                if error:
                    failed[seed] = error
    return failed


def warm_start_only(config_path: str) -> int:
    """Child process of `prepare_warm_starts`: fine-tune (or find in the cache) one seed's warm start."""
    import torch

    from sppo_fast.trainer.distributed import init_distributed
    from sppo_fast.trainer.loop import Trainer, check_device
    from sppo_fast.trainer.signals import StopRequest
    from sppo_fast.trainer.warmstart import WarmStartInterrupted, warm_start

    with open(config_path) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d, device = init_distributed(cfg.device)
    tr = Trainer(cfg, d, device, print)
    with StopRequest(print) as stop:  # SIGTERM from an interrupted comparison: keep the progress
        try:
            warm_start(cfg, tr.lm, tr.tokenizer, tr.task, device, progress=False, stop=stop)
        except WarmStartInterrupted as halt:
            print(f"sppo-fast compare: {halt}", file=sys.stderr)
            return 128 + int(halt.signum)
    return 0


# --- aggregation -----------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); nan for none."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def time_to_reach(curve: list[dict], target: float, time_key: str = "rl_seconds") -> float | None:
    """RL seconds at the first evaluation whose accuracy is at least `target` (None if never)."""
    for point in curve:
        if point["accuracy"] >= target - 1e-12:
            return point[time_key]
    return None


def signals(trace: dict) -> dict | None:
    """One run's clipping and entropy over training, from its `step_trace`: the clip fraction's mean over
    the policy updates (and over their first and last tenth), the entropy at the first update, its lowest
    value and the step where it fell there, and its value at the last update. None without those columns
    (records written before traces were kept)."""
    steps, clip, entropy = trace.get("step", []), trace.get("clipfrac"), trace.get("entropy")
    if clip is None or entropy is None:
        return None
    clips = [c for c in clip if c is not None]
    ents = [(e, s) for e, s in zip(entropy, steps) if e is not None]
    if not clips or not ents:
        return None
    tenth = max(1, len(clips) // 10)
    low, low_step = min(ents)
    return {"clipfrac": sum(clips) / len(clips), "clipfrac_first": sum(clips[:tenth]) / tenth,
            "clipfrac_last": sum(clips[-tenth:]) / tenth, "entropy_first": ents[0][0], "entropy_min": low,
            "entropy_min_step": low_step, "entropy_final": ents[-1][0]}


def signals_stats(runs: list[dict]) -> dict | None:
    """`signals` of each run, as mean +- std over the runs that have them."""
    per_run = [s for s in (signals(r.get("trace") or {}) for r in runs) if s is not None]
    if not per_run:
        return None
    return {key: mean_std([s[key] for s in per_run]) for key in per_run[0]} | {"runs": len(per_run)}


def _greedy(algo: str) -> bool:
    spec = ALGORITHMS.get(algo)
    return bool(spec and spec.greedy_baseline)


def aggregate(records: list[dict], algos: list[str], reference: str | None, time_key: str = "rl_seconds"
              ) -> dict:
    """Per algorithm: final accuracy, gain, wall-clock, rollouts, and the time to reach the reference
    algorithm's mean final accuracy (GRPO's by default) by the algorithm's mean curve over seeds, and by
    each run against the reference's run of the same seed."""
    ok = {a: [r for r in records if r["algo"] == a and r["status"] == "ok"] for a in algos}
    stats = {}
    for algo in algos:
        runs = ok[algo]
        final = [r["summary"]["eval_accuracy_after"] for r in runs]
        before = [r["summary"]["eval_accuracy_before"] for r in runs]
        stats[algo] = {
            "runs": len(runs), "failed": sum(r["algo"] == algo and r["status"] != "ok" for r in records),
            "final_accuracy": mean_std(final), "accuracy_before": mean_std(before),
            "gain": mean_std([f - b for f, b in zip(final, before)]),
            "rl_seconds": mean_std([r["curve"][-1]["rl_seconds"] for r in runs if r["curve"]]),
            "rl_cpu_seconds": mean_std([r["curve"][-1].get("rl_cpu_seconds", float("nan"))
                                        for r in runs if r["curve"]]),
            "wall_seconds": mean_std([r["summary"]["wall_seconds"] for r in runs]),
            # ReMax decodes one greedy response per prompt on top of its samples: counted as rollouts too
            "rollouts": mean_std([r["summary"]["steps"] * r["summary"]["rollouts_per_step"]
                                  * (1 + 1 / r["summary"]["samples_per_prompt"] if _greedy(algo) else 1)
                                  for r in runs]),
            "samples_per_prompt": runs[0]["summary"]["samples_per_prompt"] if runs else None,
            "signals": signals_stats(runs),
        }
    target = None
    if reference in stats and stats[reference]["runs"]:
        target = stats[reference]["final_accuracy"][0]
        ref_seconds = stats[reference][time_key][0]
        ref_final = {r["seed"]: r["summary"]["eval_accuracy_after"] for r in ok[reference]}
        for algo in algos:
            # Per run: against the reference's final accuracy of the same seed (same warm start).
            times = [time_to_reach(r["curve"], ref_final.get(r["seed"], target), time_key) for r in ok[algo]]
            # The claim: the mean curve over seeds against the reference's mean final accuracy.
            curve = mean_curve([r["curve"] for r in ok[algo] if r["curve"]], time_key)
            at = next((t for t, acc in curve if acc >= target - 1e-12), None)
            stats[algo]["time_to_reference"] = {
                "per_run": times, "reached": sum(t is not None for t in times), "mean_curve": at,
                "fraction_of_reference_time": at / ref_seconds if at is not None and ref_seconds else None}
    return {"reference": reference, "reference_final_accuracy": target, "time_key": time_key,
            "algorithms": stats}


# --- outputs ---------------------------------------------------------------------------------------

def _pct(ms) -> str:
    mean, std = ms
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} +- {100 * std:.1f}%"


def _sec(ms) -> str:
    mean, std = ms
    return "n/a" if math.isnan(mean) else f"{mean:.0f} +- {std:.0f} s"


def markdown(result: dict) -> str:
    agg, settings = result["aggregate"], result["settings"]
    ref = agg["reference"]
    lines = [f"# sppo-fast compare: {', '.join(settings['algos'])} x seeds {settings['seeds']}", "",
             f"{settings['prompts_per_step']} prompts per step, {settings['steps_note']}; held-out accuracy "
             f"sampled at T = 1 on {settings['eval_examples']} prompts; {settings['jobs']} runs at a time on "
             f"{settings['cpu']} ({settings['cores']} cores usable). RL seconds: the steps' own wall-clock; "
             "RL CPU seconds: their CPU time in the run's process (warm start and evaluations excluded from "
             f"both); time to reach is measured in {'RL CPU' if agg['time_key'] == 'rl_cpu_seconds' else 'RL'} "
             f"seconds, first on the mean curve over seeds (against {ref}'s mean final accuracy), then per seed "
             f"(against {ref}'s final accuracy with the same seed and warm start; - : not reached). "
             "Mean +- sample std over the runs that finished."
             + (" ReMax's rollouts count its greedy responses (one per prompt) too."
                if any(_greedy(a) for a in settings["algos"]) else ""), ""]
    if result.get("sweep"):
        lines += sweep_markdown(result["sweep"], settings["algos"], settings["seeds"])
        lines += [f"## Each algorithm at its best setting, on fresh seeds {settings['seeds']}", ""]
    unit = "RL CPU seconds" if agg["time_key"] == "rl_cpu_seconds" else "RL seconds"
    header = ["algorithm", "samples/prompt", "runs", "accuracy before RL", "final accuracy", "gain (points)",
              "RL seconds", "RL CPU seconds", "wall-clock (all)", "rollouts"]
    if agg["reference_final_accuracy"] is not None:
        header.append(f"{unit} to reach {ref}'s final {100 * agg['reference_final_accuracy']:.1f}%")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for algo, s in agg["algorithms"].items():
        gain = s["gain"]
        row = [algo, str(s["samples_per_prompt"]), f"{s['runs']} ok" + (f", {s['failed']} failed" if s["failed"]
                                                                         else ""),
               _pct(s["accuracy_before"]), _pct(s["final_accuracy"]),
               "n/a" if math.isnan(gain[0]) else f"{100 * gain[0]:+.1f} +- {100 * gain[1]:.1f}",
               _sec(s["rl_seconds"]), _sec(s["rl_cpu_seconds"]), _sec(s["wall_seconds"]),
               "n/a" if math.isnan(s["rollouts"][0]) else f"{s['rollouts'][0]:,.0f}"]
        if "time_to_reference" in s:
            t = s["time_to_reference"]
            seeds = ", ".join("-" if x is None else f"{x:.0f}" for x in t["per_run"])
            if t["mean_curve"] is None:
                row.append(f"not reached by the mean curve; per seed (vs {ref}'s same seed): {seeds}")
            else:
                row.append(f"{t['mean_curve']:.0f} s = {t['fraction_of_reference_time']:.2f}x {ref}'s; "
                           f"per seed (vs {ref}'s same seed): {seeds}")
        lines.append("| " + " | ".join(row) + " |")
    lines += signals_markdown(agg["algorithms"])
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs (kept out of the means):", "", "| algorithm | seed | error |", "|---|---|---|"]
        lines += [f"| {r['algo']} | {r['seed']} | `{r['error'].replace('|', '/')}` |" for r in failed]
    lines += ["", "Per run:", "", "| algorithm | seed | before | final | RL seconds | run directory |",
              "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r["status"] == "ok":
            s = r["summary"]
            lines.append(f"| {r['algo']} | {r['seed']} | {100 * s['eval_accuracy_before']:.1f}% | "
                         f"{100 * s['eval_accuracy_after']:.1f}% | {r['curve'][-1]['rl_seconds']:.0f} | "
                         f"`{os.path.relpath(r['run_dir'], result['out_dir'])}` |")
        else:
            lines.append(f"| {r['algo']} | {r['seed']} | failed | failed | | "
                         f"`{os.path.relpath(r['run_dir'], result['out_dir'])}` |")
    lines += ["", "Per-algorithm settings (on top of the `sppo-fast train` defaults):", ""]
    lines += [f"- {algo}: `{json.dumps(settings['per_algo_settings'][algo], sort_keys=True)}`"
              for algo in settings["algos"]]
    return "\n".join(lines) + "\n"


def signals_markdown(stats: dict) -> list[str]:
    """Clipping and entropy over training, per algorithm (the numbers behind clip_entropy.png)."""
    rows = [(algo, s["signals"]) for algo, s in stats.items() if s.get("signals")]
    if not rows:
        return []
    lines = ["", "Clipping and policy entropy over training (policy updates only; mean +- std over the runs; "
             "plotted per step in clip_entropy.png). Clip fraction: the share of tokens whose ratio was clipped, "
             "over all updates and over their first and last tenth; entropy in nats per token.", "",
             "| algorithm | clip fraction | first tenth | last tenth | entropy at the first update | lowest entropy "
             "(its step, mean over runs) | final entropy |", "|---|---|---|---|---|---|---|"]

    def num(ms):
        return f"{ms[0]:.3f} +- {ms[1]:.3f}"

    def pct(ms):  # clip fractions span 1e-5 (one sample, on-policy) to tens of percent (GSPO): 2 significant
        return f"{100 * ms[0]:.2g} +- {100 * ms[1]:.2g}%"

    for algo, s in rows:
        lines.append(f"| {algo} | {pct(s['clipfrac'])} | {pct(s['clipfrac_first'])} | "
                     f"{pct(s['clipfrac_last'])} | {num(s['entropy_first'])} | {num(s['entropy_min'])} "
                     f"({s['entropy_min_step'][0]:.0f}) | {num(s['entropy_final'])} |")
    return lines


def sweep_markdown(sweep: dict, algos: list[str], seeds: list[int]) -> list[str]:
    """The tuning section of compare.md: the grid, the winner per algorithm and by how much, then each
    algorithm's sweep table."""
    key = next(iter(sweep["algorithms"].values()))["time_key"] if sweep["algorithms"] else "rl_seconds"
    unit = "RL CPU seconds" if key == "rl_cpu_seconds" else "RL seconds"
    grid = ["; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in sweep["grid"].items())]
    grid += [f"{a} only: " + "; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in g.items())
             for a, g in sweep["per_algo_grid"].items()]
    lines = ["## Tuning: the same grid for every algorithm", "",
             f"Grid: {' / '.join(x for x in grid if x) or 'none'}; tuning seeds {sweep['tune_seeds']} (the fresh "
             f"seeds {seeds} took no part). The best setting of each algorithm is the one with the highest final "
             f"held-out accuracy, mean over the tuning seeds (ties: the lower {unit}); it alone runs on the fresh "
             "seeds below. Tuning runs: `tune/runs/`.", ""]
    notes = [note for a in algos for note in sweep["skipped"].get(a, [])]
    if notes:
        lines += ["Sweeps that do not apply (skipped for that algorithm): " + "; ".join(notes) + ".", ""]
    lines += ["| algorithm | settings tried | best setting | its final accuracy | runner-up | margin (points) |",
              "|---|---|---|---|---|---|"]
    for algo in algos:
        r = sweep["algorithms"][algo]
        if r["best"] is None:
            lines.append(f"| {algo} | {len(r['settings'])} | none finished | | | |")
            continue
        margin = "only setting" if r["margin"] is None else f"{100 * r['margin']:+.1f}"
        lines.append(f"| {algo} | {len(r['settings'])} | `{r['best_label']}` | {100 * r['best_accuracy']:.1f}% | "
                     f"{'`' + r['runner_up_label'] + '`' if r['runner_up_label'] else '-'} | {margin} |")
    for algo in algos:
        r = sweep["algorithms"][algo]
        lines += ["", f"### {algo}", "", f"| setting | runs | before | final accuracy | behind the best (points) | "
                  f"{unit} |", "|---|---|---|---|---|---|"]
        for row in r["settings"]:
            if not row["complete"]:
                error = "; ".join(e for e in row["errors"] if e) or "not run"
                lines.append(f"| `{row['label']}` | {row['runs']} ok, {row['failed']} failed | | failed: "
                             f"`{error.replace('|', '/')[:200]}` | | |")
                continue
            lines.append(f"| `{row['label']}`{' (best)' if row['setting'] == r['best'] else ''} | {row['runs']} | "
                         f"{_pct(row['accuracy_before'])} | {_pct(row['final_accuracy'])} | "
                         f"{100 * row['behind_best']:.1f} | {_sec(row[key])} |")
    return lines + [""]


def mean_curve(curves: list[list[dict]], key: str = "rl_seconds") -> list[tuple[float, float]]:
    """(time, mean accuracy of the runs) at every evaluation time of any run, over the time all cover."""
    if not curves:
        return []
    end = min(c[-1][key] for c in curves)
    grid = sorted({p[key] for c in curves for p in c if p[key] <= end})
    values = [_interpolate(c, grid, key) for c in curves]
    return [(t, sum(v[k] for v in values) / len(values)) for k, t in enumerate(grid)]


def _interpolate(curve: list[dict], grid: list[float], key: str = "rl_seconds") -> list[float]:
    """Accuracy of a step-wise curve at each time of `grid` (the last evaluation at or before it)."""
    out, i = [], 0
    for t in grid:
        while i + 1 < len(curve) and curve[i + 1][key] <= t:
            i += 1
        out.append(curve[i]["accuracy"])
    return out


def plot(result: dict, path: str) -> str:
    """Held-out accuracy against RL seconds: each run thin, each algorithm's mean line and +-1 std band
    over the time every one of its runs covers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = result["aggregate"]["time_key"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, algo in enumerate(result["settings"]["algos"]):
        curves = [r["curve"] for r in result["runs"] if r["algo"] == algo and r["status"] == "ok" and r["curve"]]
        if not curves:
            continue
        color = f"C{i % 10}"
        for curve in curves:
            ax.plot([p[key] for p in curve], [p["accuracy"] for p in curve], color=color, alpha=0.25,
                    linewidth=0.8)
        end = min(c[-1][key] for c in curves)
        grid = [end * k / 200 for k in range(201)]
        values = [_interpolate(c, grid, key) for c in curves]
        stats = [mean_std([v[k] for v in values]) for k in range(len(grid))]
        means = [m for m, _ in stats]
        n_samples = result["aggregate"]["algorithms"][algo]["samples_per_prompt"]
        ax.plot(grid, means, color=color, linewidth=2, label=f"{algo} (N={n_samples}, {len(curves)} seeds)")
        ax.fill_between(grid, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.2)
    target = result["aggregate"]["reference_final_accuracy"]
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                   label=f"{result['aggregate']['reference']} final mean")
    ax.set_xlabel(("RL CPU seconds" if key == "rl_cpu_seconds" else "RL wall-clock seconds")
                  + " (steps only; warm start and evaluations excluded)")
    ax.set_ylabel("held-out accuracy (sampled, T = 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _run_all(configs, jobs, out_dir, log, reuse=False) -> list[dict]:
    records = []
    if reuse:
        done = [c for c in configs if already_finished(c)]
        records = [finished_record(c) for c in done]
        configs = [c for c in configs if c not in done]
        if done:
            log(f"compare: reusing {len(done)} finished runs: "
                + ", ".join(f"{c.algo} seed {c.seed}" for c in done))
    warm_failed = prepare_warm_starts(configs, jobs, out_dir, log=log)
    todo = [c for c in configs if c.seed not in warm_failed]
    records += [{"algo": c.algo, "seed": c.seed, "run_dir": c.out, "status": "failed",
                 "error": f"warm start failed: {warm_failed[c.seed]}"} for c in configs if c.seed in warm_failed]
    log(f"compare: {len(todo)} runs, {jobs} at a time -> {out_dir}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for record in pool.map(run_one, todo):
            status = record["status"] if record["status"] == "ok" else f"FAILED ({record['error']})"
            log(f"compare: {record['algo']} seed {record['seed']}: {status}")
            records.append(record)
    return records


def compare(algos=DEFAULT_ALGOS, seeds=DEFAULT_SEEDS, out_dir="compare", *, steps=None,
            prompts_per_step=DEFAULT_PROMPTS_PER_STEP, jobs=None, overrides=(), reference="grpo",
            time_axis="wall", reuse=False, overwrite=False, sweeps=(), tune_seeds=None, log=print) -> dict:
    """Run every (algorithm, seed), write compare.{md,json}, accuracy_vs_time.png and clip_entropy.png;
    returns the result. With `sweeps` (`--sweep` items), every algorithm first runs its grid on `tune_seeds`
    (default DEFAULT_TUNE_SEEDS) in OUT/tune/, and the runs on `seeds` use each algorithm's best setting.
    An `out_dir` that holds a comparison is refused unless `reuse` (keep its finished runs, train the others
    again) or `overwrite` (train every run again). Bad input raises ValueError before anything runs."""
    if time_axis not in TIME_KEYS:
        raise ValueError(f"time_axis must be one of {', '.join(TIME_KEYS)}, got {time_axis!r}")
    time_key = TIME_KEYS[time_axis]
    common, per_algo = parse_overrides(list(overrides))
    configs = run_configs(algos, seeds, out_dir, steps=steps, prompts_per_step=prompts_per_step,
                          common=common, per_algo=per_algo)
    algos = list(algos)
    sweep_common, sweep_per_algo = parse_sweeps(list(sweeps))
    if tune_seeds is not None and not sweeps:
        raise ValueError("tune_seeds: only a sweep (--sweep) has tuning seeds")
    tune_configs, setting_of, grids, skipped = [], {}, {}, {}
    if sweeps:
        tune_seeds = list(DEFAULT_TUNE_SEEDS if tune_seeds is None else tune_seeds)
        check_seeds_apart(seeds, tune_seeds)
        for algo in sweep_per_algo:
            if algo not in algos:
                raise ValueError(f"--sweep {algo}.: {algo} is not one of --algos ({', '.join(algos)})")
        for algo in algos:
            grids[algo], skipped[algo] = sweep_grid(algo, sweep_common, sweep_per_algo)
            for key in grids[algo][0]:
                if key in common or key in per_algo.get(algo, {}):
                    raise ValueError(f"--sweep {key} and --set {key} both set {key} for {algo}: give one of them")
        tune_configs, setting_of = tuning_configs(algos, tune_seeds, out_dir, grids, steps=steps,
                                                  prompts_per_step=prompts_per_step, common=common,
                                                  per_algo=per_algo)
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    check_out_dir(out_dir, reuse=reuse, overwrite=overwrite)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"out: cannot create {out_dir}: {error.strerror or error}") from None
    start = time.time()
    sweep = None
    best_settings = {}
    try:
        if sweeps:
            sizes = ", ".join(f"{a}: {len(grids[a])} settings" for a in algos)
            log(f"compare: tuning {len(tune_configs)} runs ({sizes} x tuning seeds {tune_seeds})")
            tune_records = _run_all(tune_configs, jobs, os.path.join(out_dir, "tune"), log, reuse=reuse)
            for record in tune_records:
                record["setting"] = setting_of[record["run_dir"]]
            order = {c.out: i for i, c in enumerate(tune_configs)}
            tune_records.sort(key=lambda r: order[r["run_dir"]])
            ranking = choose_best(tune_records, algos, grids, time_key)
            best_settings = {a: r["best"] for a, r in ranking.items() if r["best"] is not None}
            for algo, r in ranking.items():
                log(f"compare: {algo}: best {r['best_label'] or 'none (every setting failed)'}"
                    + (f", {100 * r['margin']:+.1f} points over {r['runner_up_label']}" if r["margin"] is not None
                       else ""))
            sweep = {"grid": sweep_common, "per_algo_grid": sweep_per_algo, "tune_seeds": tune_seeds,
                     "skipped": skipped, "grids": grids, "algorithms": ranking, "runs": tune_records,
                     "seconds": time.time() - start}
            per_algo = {a: {**per_algo.get(a, {}), **best_settings.get(a, {})} for a in algos}
            configs = run_configs(algos, seeds, out_dir, steps=steps, prompts_per_step=prompts_per_step,
                                  common=common, per_algo=per_algo)
        untuned = [c for c in configs if sweeps and c.algo not in best_settings]
        configs = [c for c in configs if c not in untuned]
        records = _run_all(configs, jobs, out_dir, log, reuse=reuse) if configs else []
        records += [{"algo": c.algo, "seed": c.seed, "run_dir": c.out, "status": "failed",
                     "error": "not run: every setting of its sweep failed"} for c in untuned]
    except BaseException:  # Ctrl-C: leave no run behind
        _stop_live()
        raise
    order = {(c.algo, c.seed): i for i, c in enumerate(configs + untuned)}
    records.sort(key=lambda r: order[(r["algo"], r["seed"])])
    steps_by_algo = {c.algo: c.steps for c in configs + untuned}
    result = {
        "out_dir": out_dir,
        "settings": {
            "algos": algos, "seeds": list(seeds), "prompts_per_step": prompts_per_step, "jobs": jobs,
            "steps": steps_by_algo, "eval_examples": (configs + untuned)[0].eval_examples,
            "steps_note": ", ".join(f"{a} {n} steps" for a, n in steps_by_algo.items()),
            "cpu": cpu_name(), "cores": default_jobs(), "overrides": list(overrides), "sweeps": list(sweeps),
            "per_algo_settings": {c.algo: {**ALGO_SETTINGS[c.algo], **common, **per_algo.get(c.algo, {})}
                                  for c in configs + untuned},
            "total_seconds": time.time() - start,
        },
        "runs": records,
        "aggregate": aggregate(records, algos, reference if reference in algos else None, time_key),
    }
    if sweep is not None:
        result["sweep"] = sweep
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(_json_safe(result), f, indent=2)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown(result))
    written = ["compare.md", "compare.json"]
    for name, draw in (("accuracy_vs_time.png", plot), ("clip_entropy.png", _plot_signals)):
        try:
            draw(result, os.path.join(out_dir, name))
            written.append(name)
        except Exception as error:  # a plot must never lose the table
            log(f"compare: plotting {name} failed: {error!r}")
    log(f"compare: wrote {out_dir}/{', '.join(written)}")
    return result


def _plot_signals(result: dict, path: str) -> str:
    from sppo_fast.trainer.plots import plot_training_signals

    return plot_training_signals(result["runs"], path, algos=result["settings"]["algos"])


def check_out_dir(out_dir: str, *, reuse: bool, overwrite: bool):
    """Refuse an --out that already holds a comparison (its table or any run) unless --reuse or --overwrite."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out: {out_dir} exists and is not a directory")
    if reuse or overwrite or not os.path.isdir(out_dir):
        return
    held = [name for name in ("compare.json", "compare.md") if os.path.exists(os.path.join(out_dir, name))]
    for sub in ("runs", "tune"):
        runs = os.path.join(out_dir, sub)
        if os.path.isdir(runs) and os.listdir(runs):
            held.append(f"{sub}/")
    if held:
        raise UserError(f"out: {out_dir} already holds a comparison ({', '.join(held)}); pass --reuse to keep its "
                        "finished runs, --overwrite to train every run again, or another --out")


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


PROG = "sppo-fast compare"


def parser() -> argparse.ArgumentParser:
    from sppo_fast.trainer.cli import OneLineParser

    p = OneLineParser(
        prog=PROG,
        description="Train every algorithm of --algos with every seed of --seeds (one process per run, --jobs "
                    "at a time), at the same number of prompts per step, and write compare.md, compare.json, "
                    "accuracy_vs_time.png and clip_entropy.png into --out; with --sweep, tune every algorithm on "
                    "the same grid first (on --tune-seeds) and run each at its best setting. A run that fails is "
                    "reported with its error; the others are kept. An --out that holds a comparison is refused "
                    "unless --reuse or --overwrite is given. Bad input exits 2 with one line naming what is "
                    "wrong (--debug: with a traceback).")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                   help=f"comma-separated algorithms from {', '.join(ALGOS)} (default: %(default)s). "
                        + "; ".join(f"{a}: {ALGORITHMS[a].about}" for a in ("remax", "ppo_bce", "sspo_noadapt")))
    p.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS),
                   help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="RL steps of every run (default: train's default)")
    p.add_argument("--prompts_per_step", "--prompts-per-step", type=int, default=DEFAULT_PROMPTS_PER_STEP,
                   help="prompts per RL step, the same for every algorithm (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: usable cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[ALGO.]KEY=VALUE",
                   help="override a `sppo-fast train` field for every algorithm, or for ALGO only; repeatable")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="[ALGO.]KEY=V1,V2,...",
                   help="tune first: every algorithm runs the same grid (the product of the sweeps; repeatable) on "
                        "--tune-seeds, then each runs at its best setting (final held-out accuracy, ties: the "
                        "faster) on --seeds. A clip_low/clip_high sweep skips algorithms whose clip range is on "
                        "another scale (gspo) unless given as ALGO.KEY; the report says what was skipped")
    p.add_argument("--tune-seeds", "--tune_seeds", dest="tune_seeds", type=_int_list, default=None,
                   help="comma-separated tuning seeds of --sweep, apart from --seeds "
                        f"(default: {','.join(map(str, DEFAULT_TUNE_SEEDS))})")
    p.add_argument("--reference", default="grpo",
                   help="algorithm whose mean final accuracy the others must reach (default: %(default)s)")
    p.add_argument("--time", dest="time_axis", choices=sorted(TIME_KEYS), default="wall",
                   help="time axis of the plot and of the time to reach the reference: the RL steps' wall-clock "
                        "or their CPU time (fairer on a machine shared with other jobs; default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: compare-<timestamp>)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs in --out that finished with exactly the same configuration (an interrupted "
                        "comparison, or one whose other algorithms changed) instead of training them again; the "
                        "other runs in --out are replaced")
    p.add_argument("--overwrite", action="store_true",
                   help="train every run again when --out already holds a comparison (without it, or --reuse, "
                        "such an --out is refused)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error about bad input")
    p.add_argument("--warm-start-only", dest="warm_start_only", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    from sppo_fast.trainer.cli import report_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser().parse_args(argv)
        if args.warm_start_only:
            return warm_start_only(args.warm_start_only)
        if args.reuse and args.overwrite:
            raise UserError("--reuse keeps the finished runs and --overwrite trains them again: give one of them")
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        out = args.out or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        result = compare(algos, args.seeds, out, steps=args.steps, prompts_per_step=args.prompts_per_step,
                         jobs=args.jobs, overrides=args.overrides, reference=args.reference,
                         time_axis=args.time_axis, reuse=args.reuse, overwrite=args.overwrite,
                         sweeps=args.sweeps, tune_seeds=args.tune_seeds,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as error:  # compare() raises ValueError (UserError among them) for bad input only
        if debug:
            raise
        return report_error(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the runs in flight were stopped; --reuse keeps the runs that finished and "
              "trains the others again", file=sys.stderr, flush=True)
        return 130
    print(open(os.path.join(out, "compare.md")).read())
    return 0 if all(r["status"] == "ok" for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
