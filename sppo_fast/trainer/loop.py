"""The training loop of `sppo-fast train`: one readable loop (`_train`) over a small `Trainer` whose
`step` is one RL step.

Per step: draw prompts, sample responses (KV cache), score them, compute the old log-probs and the
critic's values (both before any update), the advantages of the algorithm, then PPO epochs of
mini-batch updates of the policy with the fused linear policy loss (the full logits never exist) and
of the critic. Everything the run writes goes to its run directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import torch

import sppo_fast
from sppo_fast.trainer import algorithms as algos
from sppo_fast.trainer.checkpoint import (
    find_checkpoint,
    gather_training_state,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from sppo_fast.trainer.config import TrainConfig, UserError
from sppo_fast.trainer.distributed import (
    Dist,
    average_replicated_grads,
    init_distributed,
    shard_decoder_layers,
    shard_vocabulary,
    shutdown,
    use_fsdp2,
    wrap_for_training,
)
from sppo_fast.trainer.loss_impls import check_loss_impl, policy_loss_from_hidden
from sppo_fast.trainer.models import (
    PolicyHidden,
    build_critic,
    build_policy,
    check_model_dir,
    describe_model,
    enable_checkpointing,
    lm_head_of,
    load_tokenizer,
)
from sppo_fast.trainer.rollout import Rollout, check_positions, encode_prompts, generate, generate_greedy_baseline
from sppo_fast.trainer.signals import RunInterrupted, StopRequest

EVAL_BATCH = 256


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """Turn the ValueError / OSError of reading the user's input (a task file, a model directory, a length
    that does not fit) into a UserError: one line, exit 2, no traceback."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        what = f"{error.filename}: " if getattr(error, "filename", None) else ""
        raise UserError(f"{prefix}{what}{error.strerror or error}") from error
    except ValueError as error:
        raise UserError(f"{prefix}{error}") from error


def make_task(cfg):
    with user_errors("task_path: " if cfg.task == "jsonl" else f"task {cfg.task}: "):
        return _make_task(cfg)


def _make_task(cfg):
    from sppo_fast.trainer.tasks import get_task

    if cfg.task == "arithmetic":
        return get_task("arithmetic", difficulty=cfg.task_difficulty)
    if cfg.task == "countdown":
        return get_task("countdown")
    if cfg.task == "long_arithmetic":
        return get_task("long_arithmetic", difficulty=cfg.task_difficulty)
    if cfg.task == "jsonl":
        if not cfg.task_path:
            raise ValueError("task_path: --task jsonl needs --task_path FILE.jsonl")
        return get_task("jsonl", path=cfg.task_path)
    raise ValueError(f"task: unknown {cfg.task!r}; choose arithmetic, countdown, long_arithmetic or jsonl")


def step_examples(task, cfg, step: int):
    """The prompts of RL step `step` (1-based): a function of (seed, step) only, so a resumed run draws
    exactly what the uninterrupted one would have."""
    return task.examples("train", cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step)


def lr_lambda(cfg):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0
    return factor


def autocast_for(device):
    """bf16 autocast for the forward passes on a GPU; nothing on CPU (fp32 throughout)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


def maybe_autocast(device):
    make = autocast_for(device)
    return make() if make else contextlib.nullcontext()


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(lm, tokenizer, task, examples, cfg, device, d: Dist, temperature=None) -> float:
    """Held-out accuracy (mean reward) of `lm`, this rank's share of `examples` summed over ranks.
    Sampled evaluations draw from their own fixed seed (the same draws at every evaluation, which makes
    before/after comparisons less noisy) and leave the training generator untouched."""
    from sppo_fast.trainer.tasks import score_responses

    temperature = cfg.eval_temperature if temperature is None else temperature
    # any count works: the totals are summed over ranks (tensor-parallel ranks count the same share each,
    # numerator and denominator alike)
    mine = examples[d.dp_rank::d.dp_size]
    correct = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 4242 + d.dp_rank)  # tensor-parallel ranks sample alike
        for i in range(0, len(mine), EVAL_BATCH):
            batch = mine[i: i + EVAL_BATCH]
            rollout = generate(lm, tokenizer, [ex.prompt for ex in batch], max_new_tokens=cfg.max_new_tokens,
                               temperature=temperature, device=device, autocast=autocast_for(device))
            rewards, _ = score_responses(task, rollout.texts, batch)
            correct += sum(rewards)
    total = d.all_sum(torch.tensor([correct, float(len(mine))]))
    return float(total[0] / total[1])


# --- one RL step -----------------------------------------------------------------------------------

@torch.no_grad()
def response_logprobs(hidden_model, lm, rollout: Rollout, temperature, device):
    """Log-probs of the sampled response tokens, from hidden states times lm_head (never full logits)."""
    with maybe_autocast(device):
        hidden = rollout.response_slice(hidden_model(rollout.input_ids, rollout.attention_mask))
    weight, bias = lm_head_of(lm)
    hidden, weight, bias = match_dtype(hidden, weight, bias)
    return sppo_fast.linear_logprobs(hidden, weight, rollout.response_ids, bias=bias, temperature=temperature)


def use_sampler_logprobs(choice: str, device) -> bool:
    """Whether the old log-probs come from the sampler's logits (`old_logprobs`): auto takes them in fp32
    (the CPU), where the cached decode and a full forward agree to rounding, and recomputes them under bf16
    autocast (a GPU), where the two round apart by about 1e-2."""
    if choice == "auto":
        return autocast_for(device) is None
    return choice == "sampler"


def match_dtype(hidden, weight, bias):
    """Feed the fused op one dtype: the hidden states' (bf16 under autocast), gradients still reach the
    fp32 master weight through the cast."""
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return hidden, weight, bias


def loss_normalizer(policy_loss_config, mask: torch.Tensor, d: Dist):
    """The global denominator of the loss across ranks (None in a single process: the local one)."""
    if not d.data_parallel:  # one process, or tensor-parallel ranks that all hold the whole batch
        return None
    if policy_loss_config.aggregation == "token-mean":
        local = mask.sum()
    elif policy_loss_config.aggregation == "seq-mean-token-sum-norm":
        local = torch.tensor(mask.shape[0])  # Dr. GRPO: B * L, every sequence counts
    else:  # the other sequence means divide by the number of sequences with a token
        local = (mask.sum(1) > 0).sum()
    return float(d.all_sum(local.float()))


class Trainer:
    """State of a run; `train()` below drives it."""

    def __init__(self, cfg: TrainConfig, d: Dist, device, log):
        self.cfg, self.d, self.device, self.log = cfg, d, device, log
        if cfg.model:
            check_model_dir(cfg.model)
        with user_errors(f"model: cannot load {cfg.model}: " if cfg.model else ""):
            self.tokenizer = load_tokenizer(cfg)
        self.task = make_task(cfg)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        with user_errors():
            check_loss_impl(cfg.loss_impl, device)
        with user_errors(f"model: cannot load {cfg.model}: " if cfg.model else ""):
            self.lm = build_policy(cfg, self.tokenizer, device)
            critic_cfg = algos.critic_config(cfg)  # the algorithm's critic kind, or None
            self.critic = None if critic_cfg is None else build_critic(critic_cfg, self.tokenizer, device)
        with user_errors():
            self.check_lengths()
        self.algo = algos.spec(cfg)
        self.loss_cfg = algos.loss_config(cfg)
        self.estimator = algos.estimator_name(cfg, self.loss_cfg)
        self.ref = None
        self.sampler_logprobs = use_sampler_logprobs(cfg.old_logprobs, device)

    def check_lengths(self):
        """Before any training: the task's longest prompt (over a sample of both splits) plus
        max_new_tokens must fit in the policy's positions; every rollout checks its own batch too."""
        examples = (self.task.examples("train", 256, seed=self.cfg.seed)
                    + self.task.examples("test", min(self.cfg.eval_examples, 256), seed=self.cfg.seed + 1))
        prompt_ids, _ = encode_prompts(self.tokenizer, [ex.prompt for ex in examples], "cpu")
        check_positions(self.lm, prompt_ids.shape[1], self.cfg.max_new_tokens)

    def setup_training(self):
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.lm)
        if cfg.kl_coef > 0:
            self.ref = copy.deepcopy(self.lm).eval().requires_grad_(False)
        if self.d.tensor_parallel > 1:  # after the warm start and the reference copy: those stay whole
            shard_vocabulary(self.lm, self.d)
        self.hidden_model = PolicyHidden(self.lm)
        self.replicated = None  # FSDP2: the policy parameters whose gradients we average ourselves
        if self.d.tensor_parallel == 1 and use_fsdp2(cfg.parallel, self.d, self.device):
            self.replicated = shard_decoder_layers(self.lm)
            self.policy_ddp = self.hidden_model
        else:
            self.policy_ddp = wrap_for_training(self.hidden_model, self.d, self.device)
        self.critic_ddp = None
        if self.critic is not None:
            self.critic_ddp = wrap_for_training(self.critic, self.d, self.device)
        # foreach kernels do not take a mix of sharded (DTensor) and plain tensors
        self.opt = torch.optim.AdamW(self.lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     eps=cfg.adam_eps,
                                     foreach=False if self.replicated is not None or self.d.tensor_parallel > 1
                                     else None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.critic_opt = None
        if self.critic is not None:
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr,
                                                weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    def rollout(self, step):
        """Sample this rank's share of the step's prompts, `group_size` responses each, and score them.
        ReMax (`greedy_baseline`) also decodes one greedy response per prompt with the same policy and keeps
        its reward, repeated for each sample of the prompt, as `rollout.baseline_rewards`."""
        from sppo_fast.trainer.tasks import score_responses

        cfg = self.cfg
        prompts_here = self.d.shard(step_examples(self.task, cfg, step))
        examples = [ex for ex in prompts_here for _ in range(cfg.group_size)]
        rollout = generate(self.lm, self.tokenizer, [ex.prompt for ex in examples],
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           device=self.device, autocast=autocast_for(self.device),
                           logprobs=self.sampler_logprobs)
        if not self.algo.greedy_baseline:
            rewards, counts = score_responses(self.task, rollout.texts, examples)
        else:
            greedy = generate_greedy_baseline(self.lm, self.tokenizer, [ex.prompt for ex in prompts_here],
                                              max_new_tokens=cfg.max_new_tokens, device=self.device,
                                              autocast=autocast_for(self.device))
            # one verifier call for both: the sampled responses, then the greedy ones
            both, counts = score_responses(self.task, rollout.texts + greedy.texts, examples + prompts_here)
            rewards, baseline = both[:len(examples)], both[len(examples):]
            rollout.baseline_rewards = torch.tensor(baseline, dtype=torch.float32, device=self.device
                                                    ).repeat_interleave(cfg.group_size)
        return rollout, torch.tensor(rewards, dtype=torch.float32, device=self.device), counts

    @torch.no_grad()
    def critic_values(self, rollout):
        """SPPO: the prompt critic's logits; PPO: token values over the response. Taken before the
        critic's update (docs/api.md §3.7)."""
        if self.algo.critic == "prompt":
            return self.critic(rollout.prompt_ids, rollout.prompt_mask), None
        if self.algo.critic == "token":
            with maybe_autocast(self.device):
                values = self.critic(rollout.input_ids, rollout.attention_mask)
            return None, algos.token_values(self.algo, rollout.response_slice(values))
        return None, None

    def policy_update(self, mb: Rollout, old_logp, advantages, ref_logp, segments):
        cfg = self.cfg
        with maybe_autocast(self.device):
            hidden = mb.response_slice(self.policy_ddp(mb.input_ids, mb.attention_mask))
        weight, bias = lm_head_of(self.lm)
        hidden, weight, bias = match_dtype(hidden, weight, bias)
        out = policy_loss_from_hidden(
            cfg.loss_impl, hidden, weight, bias, mb.response_ids, old_logp, advantages, mb.response_mask,
            self.loss_cfg, segment_ids=segments, ref_logp=ref_logp, temperature=cfg.temperature,
            normalizer=loss_normalizer(self.loss_cfg, mb.response_mask, self.d), chunk_size=cfg.chunk_size)
        # DDP averages gradients over ranks; the loss is already divided by the global count, so undo
        # the average to get the gradient of the global loss. Tensor-parallel ranks are one replica.
        self.opt.zero_grad(set_to_none=True)
        (out.loss * self.d.dp_size).backward()
        if self.replicated is not None:
            average_replicated_grads(self.replicated, self.d)
        grad_norm = clip(self.lm.parameters(), cfg.grad_clip, self.d)
        self.opt.step()
        metrics = {k: float(v) for k, v in out.metrics.items()}
        metrics.update(loss=float(out.loss.detach()), grad_norm=grad_norm)
        return metrics

    def critic_update(self, mb: Rollout, rewards, returns):
        with maybe_autocast(self.device):
            loss = algos.critic_loss(self.algo, self.critic_ddp, mb, rewards, returns)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(self.critic.parameters(), self.cfg.grad_clip)
        self.critic_opt.step()
        return float(loss.detach())

    def step(self, step: int) -> dict:
        cfg = self.cfg
        t0, cpu0 = time.time(), time.process_time()
        self.lm.train()
        rollout, rewards, counts = self.rollout(step)
        t_rollout = time.time() - t0
        mask = rollout.response_mask
        if rollout.logprobs is not None:  # the sampler's own: the same policy, no second forward pass
            old_logp = rollout.logprobs
        else:
            old_logp = response_logprobs(self.hidden_model, self.lm, rollout, cfg.temperature, self.device)
        ref_logp = None
        if self.ref is not None:
            ref_logp = response_logprobs(PolicyHidden(self.ref), self.ref, rollout, cfg.temperature,
                                         self.device)
        critic_logits, values = self.critic_values(rollout)
        advantages, returns = algos.compute_advantages(self.estimator, algos.AdvantageInputs(
            rewards=rewards, response_mask=mask, group_size=cfg.group_size, critic_logits=critic_logits,
            values=values, gamma=cfg.gamma, lam=cfg.lam, baseline_rewards=rollout.baseline_rewards))
        segments = algos.segment_ids_for(cfg, self.loss_cfg, self.tokenizer, rollout.response_ids, mask)

        policy_metrics, critic_losses = [], []
        n = len(rollout.texts)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for part in torch.chunk(order, cfg.mini_batches):
                if len(part) == 0:
                    continue
                mb = rollout.select(part)
                rows = _rows(part.to(self.device), mb.response_ids.shape[1])
                if step > cfg.critic_warmup_steps or self.critic is None:
                    policy_metrics.append(self.policy_update(
                        mb, rows(old_logp), rows(advantages), rows(ref_logp), rows(segments)))
                if self.critic is not None:
                    critic_losses.append(self.critic_update(mb, rows(rewards), rows(returns)))
        with warnings.catch_warnings():
            # The schedule counts RL steps, critic-only ones included; torch warns when the first of
            # them steps it before any policy update, which is intended here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.sched.step()
        step_time = time.time() - t0
        m = self.step_metrics(step, rollout, rewards, counts, critic_logits, values, returns,
                              policy_metrics, critic_losses, step_time, t_rollout)
        # This process's own CPU time for the step: on a shared machine the wall-clock also counts the
        # others' work, this does not.
        m["step_cpu_time"] = time.process_time() - cpu0
        if rollout.baseline_rewards is not None:  # ReMax: the greedy responses' mean reward (the baseline)
            base = rollout.baseline_rewards
            m["greedy_reward"] = float(self.d.all_sum(float(base.sum()))) / float(self.d.all_sum(float(base.numel())))
        return m

    def step_metrics(self, step, rollout, rewards, counts, critic_logits, values, returns,
                     policy_metrics, critic_losses, step_time, t_rollout) -> dict:
        d = self.d
        lengths = rollout.response_mask.sum(1).float()
        local = {
            "reward": rewards.sum(), "accuracy": (rewards > 0.5).float().sum(),
            "response_length": lengths.sum(), "truncated": rollout.truncated.float().sum(),
            "verifier_errors": float(counts["verifier_errors"]),
            "verifier_timeouts": float(counts["verifier_timeouts"]),
        }
        if critic_logits is not None:
            # The critic's BCE on this step's fresh rollouts, before its update: out of sample.
            local["critic_bce"] = torch.nn.functional.binary_cross_entropy_with_logits(
                critic_logits.float(), rewards.float(), reduction="sum")
        keys = list(local)
        sums = d.all_sum(torch.stack([torch.as_tensor(local[k], dtype=torch.float64).cpu() for k in keys]))
        n = float(d.all_sum(float(len(rollout.texts))))
        m = {"step": step}
        for k, v in zip(keys, sums.tolist()):
            m[k] = v if k.startswith("verifier") else v / n
        m["truncated_frac"] = m.pop("truncated")
        if critic_logits is not None:
            # What a critic that knew only the batch's success rate would score: the bar to beat.
            m["reward_entropy"] = binary_entropy(m["reward"])
        # Mean over mini-batches, then over ranks.
        for key in (policy_metrics[0] if policy_metrics else ()):
            m[key] = float(d.all_sum(np.mean([pm[key] for pm in policy_metrics]))) / d.world_size
        if critic_losses:
            m["critic_loss"] = float(d.all_sum(float(np.mean(critic_losses)))) / d.world_size
            m["critic_explained_variance"] = self.explained_variance(rewards, critic_logits, values, returns,
                                                                     rollout.response_mask)
        m["lr"] = self.sched.get_last_lr()[0]
        m["tokens_per_s"] = float(d.all_sum(lengths.sum())) / d.tensor_parallel / step_time
        m["step_time"] = step_time
        m["rollout_time"] = t_rollout
        return m

    def explained_variance(self, rewards, critic_logits, values, returns, mask):
        if critic_logits is not None:
            return algos.explained_variance(torch.sigmoid(critic_logits), rewards)
        return algos.explained_variance(values, returns, mask)

    def state_objects(self):
        return dict(optimizers={"policy": self.opt, "critic": self.critic_opt},
                    schedulers={"policy": self.sched})


# --- the run ---------------------------------------------------------------------------------------

def greedy_accuracy(tr, examples, cfg, device, d, sampled_accuracy):
    """Greedy-decoding accuracy, reported next to a sampled evaluation (the same number when the
    evaluation is greedy already)."""
    if cfg.eval_temperature <= 0:
        return sampled_accuracy
    return evaluate(tr.lm, tr.tokenizer, tr.task, examples, cfg, device, d, temperature=0.0)


def binary_entropy(p: float) -> float:
    """Entropy (nats) of a 0/1 outcome with success probability p."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


CRITIC_KEYS = ("critic_explained_variance", "critic_bce", "reward_entropy")


def critic_summary(metrics_path: str, steps: int) -> dict:
    """The critic over the last quarter of the run (metrics.jsonl, resumed parts included): mean explained
    variance of the reward by V = sigmoid(z), and its BCE before each update next to the entropy of the
    batch's base rate (a critic that learned prompt difficulty scores below it)."""
    if not os.path.exists(metrics_path):
        return {}
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    first = steps - max(1, steps // 4) + 1
    out = {}
    for key in CRITIC_KEYS:
        values = [r[key] for r in rows if r.get("step", 0) >= first and r.get(key) is not None]
        if values:
            out[f"{key}_last_quarter"] = float(np.mean(values))
    return out


def _broadcast_out(cfg, d: Dist) -> str:
    out = [cfg.resolved_out()]
    if d.enabled:
        torch.distributed.broadcast_object_list(out, src=0)
    return out[0]


def _clean(obj):
    """JSON-safe floats (nan -> None)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    return obj


def _rows(index, width):
    """Select rows of a per-sequence (B,) or per-token (B, T) tensor, cutting tokens to `width`."""
    def take(x):
        if x is None:
            return None
        return x[index] if x.dim() == 1 else x[index, :width]
    return take


def clip(params, max_norm, d: Dist | None = None):
    """Clip the global gradient norm; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    from torch.distributed.tensor import DTensor

    if any(isinstance(p.grad, DTensor) for p in params):
        return _clip_sharded(params, max_norm, d)
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0


def _clip_sharded(params, max_norm, d: Dist) -> float:
    """FSDP2: each rank holds a shard of the layers' gradients (summed over ranks) and a whole copy of the
    replicated ones (counted once). Tensor parallel: lm_head's gradient is sharded, the vocabulary-split
    embedding's comes back replicated (a whole copy on each rank, counted once)."""
    from torch.distributed.tensor import DTensor

    def is_split(g):
        return isinstance(g, DTensor) and any(not p.is_replicate() for p in g.placements)

    def local(g):
        return g.to_local() if isinstance(g, DTensor) else g

    zero = torch.zeros((), dtype=torch.float32)
    sharded = sum(((local(p.grad).float() ** 2).sum().cpu() for p in params if is_split(p.grad)), zero)
    whole = sum(((local(p.grad).float() ** 2).sum().cpu() for p in params if not is_split(p.grad)), zero)
    total = math.sqrt(float(d.all_sum(sharded.detach().cpu())) + float(whole))
    if max_norm and max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return total


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(_clean(row)) + "\n")


def truncate_metrics(path, last_step):
    """On resume, drop rows written after the checkpoint (a crash between checkpoint and exit)."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill mid-write
                continue
            if isinstance(row, dict) and row.get("step", 0) <= last_step:
                rows.append(json.dumps(row) + "\n")
    with open(path, "w") as f:
        f.writelines(rows)


# What a run directory holds; `--overwrite` deletes these (and only these) before the new run writes its own.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint", "checkpoint.old")
RUN_OUTPUTS = RUN_FILES + ("checkpoint.tmp", "accuracy.png", "reward.png")


def check_device(request: str):
    """A GPU that was asked for must exist (torch would fail deep inside with an AttributeError)."""
    if request == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "torch sees no CUDA GPU")
        raise UserError(f"device: cuda was requested, but {why} (torch {torch.__version__}); use --device cpu "
                        "or auto")


def check_run_dir(out: str, *, resume: bool, overwrite: bool, algo: str | None = None) -> list[str]:
    """Refuse to write over a run unless told to (`overwrite`) or continuing it (`resume`); a resumed
    directory must exist and hold a run of the same `algo`. Returns the run files found. Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"out: {out} exists and is not a directory")
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if resume:
        if not os.path.isdir(out):
            raise UserError(f"resume: {out} does not exist (nothing to resume)")
        if "config.json" not in found:
            raise UserError(f"resume: {out} holds no run (no config.json)")
        from sppo_fast.trainer.config import load_config_file

        try:
            saved = load_config_file(os.path.join(out, "config.json")).get("algo")
        except UserError as error:
            raise UserError(f"resume: the run's config.json is damaged: {error}") from None
        if algo is not None and saved != algo:
            raise UserError(f"resume: {out} is a {saved} run; algo {algo} would switch its algorithm mid-way "
                            "(start a new run with another --out instead)")
    elif found and not overwrite:
        kind = "a finished run" if "summary.json" in found else "a started run"
        raise UserError(f"out: {out} already holds {kind} ({', '.join(found)}); pass --resume {out} to continue "
                        "it, --overwrite to replace it, or another --out")
    return found


def _make_writable_dir(path: str, what: str):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError(f"{what} {path}: {error.strerror or error}") from None


def _remove_run_outputs(out: str):
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) a training run; returns the summary (also written to RUN_DIR/summary.json).

    An `out` that holds a run is refused (UserError) unless `resume` (continue it) or `overwrite` (replace
    it). SIGINT/SIGTERM stop the run after the current step: it is checkpointed (or the warm start's
    progress kept), then RunInterrupted says how to resume."""
    start_wall = time.time()
    check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d, device = init_distributed(cfg.device, cfg.tensor_parallel)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.is_main else (lambda msg: None)
    try:
        with StopRequest(log) as stop:
            summary = _train(cfg, d, device, resume, overwrite, start_wall, stop, log)
    except BaseException:
        shutdown(d, failed=True)
        raise
    shutdown(d)
    return summary


def _resume_hint(out: str) -> str:
    return f"resume with: sppo-fast train --resume {out}"


def _train(cfg, d, device, resume, overwrite, start_wall, stop, log):
    from tqdm import tqdm

    out = _broadcast_out(cfg, d)
    # Everything that can be checked is checked before anything is written or trained.
    found = check_run_dir(out, resume=resume, overwrite=overwrite, algo=cfg.algo)
    ckpt = find_checkpoint(out) if resume else None
    d.barrier()  # every rank has looked before the main rank writes anything
    if resume and ckpt is None and os.path.isdir(os.path.join(out, "checkpoint")):
        raise UserError(f"resume: {os.path.join(out, 'checkpoint', 'state.pt')} is missing: the checkpoint is "
                        "damaged (start again with --overwrite)")
    tr = Trainer(cfg, d, device, log)
    if ckpt is not None:
        verify_checkpoint(ckpt, {"policy": tr.lm, "critic": tr.critic})
    if d.is_main:
        if cfg.warm_start and (ckpt is None or cfg.kl_coef > 0):
            from sppo_fast.trainer.warmstart import cache_root

            _make_writable_dir(os.path.join(cache_root(cfg), "warmstart"), "cache_dir: cannot write the warm-start "
                                                                            "cache")
        _make_writable_dir(out, "out: cannot write the run directory")
        if overwrite and found:
            log(f"--overwrite: replacing the run in {out} ({', '.join(found)})")
            _remove_run_outputs(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    d.barrier()
    metrics_path = os.path.join(out, "metrics.jsonl")
    if resume and ckpt is None:
        log(f"resume: {out} has no checkpoint yet (stopped before its first one): starting it from step 0")

    warm_seconds = 0.0
    # A resumed run takes its weights from the checkpoint; it needs the warm start only as the KL reference.
    if cfg.warm_start and (ckpt is None or cfg.kl_coef > 0):
        from sppo_fast.trainer.warmstart import WarmStartInterrupted, warm_start

        t = time.time()
        try:
            warm_start(cfg, tr.lm, tr.tokenizer, tr.task, device, is_main=d.is_main, barrier=d.barrier, log=log,
                       progress=cfg.progress and d.is_main, stop=stop)
        except WarmStartInterrupted as halt:
            raise RunInterrupted(f"interrupted by {stop.name} during the warm start (SFT step {halt.step} of "
                                 f"{halt.total}); its progress is kept in {halt.partial}; {_resume_hint(out)}",
                                 halt.signum) from None
        warm_seconds = time.time() - t
    tr.setup_training()
    test_examples = tr.task.examples("test", cfg.eval_examples, seed=cfg.seed + 1)
    log(f"run dir: {out}; algo {cfg.algo} (advantage: {tr.estimator}); policy "
        f"{describe_model(tr.lm)['parameters']:,} params; {cfg.prompts_per_step} prompts x {cfg.group_size} "
        f"samples per step; world size {d.world_size}; device {device}")

    step0, extra = 0, {}
    if ckpt is not None:
        with user_errors():
            state = load_checkpoint(ckpt, policy=tr.lm, critic=tr.critic, device=device, rank=d.rank,
                                    **tr.state_objects())
        step0, extra = int(state["step"]), dict(state["extra"])
        if d.is_main:
            truncate_metrics(metrics_path, step0)
        log(f"resumed from {ckpt} at step {step0}")
        acc_before = extra["eval_accuracy_before"]
        greedy_before = extra["eval_accuracy_greedy_before"]
    else:
        if d.is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)
        seed_everything(cfg.seed * 7 + 1 + d.dp_rank)  # each data-parallel rank samples its own responses
        acc_before = evaluate(tr.lm, tr.tokenizer, tr.task, test_examples, cfg, device, d)
        greedy_before = greedy_accuracy(tr, test_examples, cfg, device, d, acc_before)
        log(f"eval accuracy before RL: {acc_before:.3f} (greedy {greedy_before:.3f})")
        if d.is_main:
            append_jsonl(metrics_path, {"step": 0, "wall": time.time() - start_wall,
                                        "eval_accuracy": acc_before, "eval_accuracy_greedy": greedy_before})
    # Time already spent by earlier invocations of this run (resume), so wall-clock plots continue.
    wall_offset = float(extra.get("wall_seconds", 0.0))
    rl_start = time.time()

    def wall():
        return wall_offset + time.time() - start_wall

    acc = extra.get("eval_accuracy_last", acc_before)
    greedy_after = None
    bar = tqdm(range(step0 + 1, cfg.steps + 1), desc=f"{cfg.algo}", initial=step0, total=cfg.steps,
               disable=not (cfg.progress and d.is_main), dynamic_ncols=True)
    for step in bar:
        m = tr.step(step)
        m["wall"] = wall()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = evaluate(tr.lm, tr.tokenizer, tr.task, test_examples, cfg, device, d)
            m["eval_accuracy"] = acc
        if step == cfg.steps:
            greedy_after = m["eval_accuracy_greedy"] = greedy_accuracy(tr, test_examples, cfg, device, d, acc)
        if d.is_main:
            append_jsonl(metrics_path, m)
        bar.set_postfix(reward=f"{m['reward']:.2f}", eval=f"{acc:.2f}", ent=f"{m.get('entropy', 0):.2f}")
        stopping = bool(stop) and step < cfg.steps
        if d.enabled:  # every rank stops at the same step (a signal may reach only some of them)
            stopping = bool(d.all_sum(float(stopping)) > 0)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
            extra = {"eval_accuracy_before": acc_before, "eval_accuracy_greedy_before": greedy_before,
                     "eval_accuracy_last": acc, "wall_seconds": wall()}
            gathered = gather_training_state(step=step, policy=tr.lm, critic=tr.critic, device=device,
                                             world_size=d.world_size, extra=extra, **tr.state_objects())
            if d.is_main:
                save_checkpoint(out, gathered)
            d.barrier()
        if stopping:
            bar.close()
            raise RunInterrupted(f"interrupted by {stop.name or 'a signal'} at step {step} of {cfg.steps}; "
                                 f"checkpoint saved in {os.path.join(out, 'checkpoint')}; {_resume_hint(out)}",
                                 stop.signum or 15)
    bar.close()
    if step0 >= cfg.steps:  # resumed a finished run: nothing ran, measure again
        greedy_after = greedy_accuracy(tr, test_examples, cfg, device, d, acc)

    summary = {
        "algo": cfg.algo, "task": cfg.task, "task_difficulty": cfg.task_difficulty,
        "eval_accuracy_before": acc_before, "eval_accuracy_after": acc,
        "eval_temperature": cfg.eval_temperature, "eval_examples": cfg.eval_examples,
        "eval_accuracy_greedy_before": greedy_before, "eval_accuracy_greedy_after": greedy_after,
        "wall_seconds": wall(), "warm_start_seconds": warm_seconds, "rl_seconds": time.time() - rl_start,
        # CPU time of this process (all its threads): on a shared machine, the part of the wall-clock
        # that was this run's own work.
        "cpu_seconds": time.process_time(),
        "steps": cfg.steps, "resumed_from_step": step0 if ckpt is not None else None,
        "rollouts_per_step": cfg.rollouts_per_step, "samples_per_prompt": cfg.group_size,
        "policy_parameters": describe_model(tr.lm)["parameters"],
        "critic_parameters": describe_model(tr.critic)["parameters"] if tr.critic is not None else 0,
        "world_size": d.world_size, "device": str(device), "torch_threads": torch.get_num_threads(),
        "run_dir": out,
    }
    if tr.critic is not None and d.is_main:
        summary.update(critic_summary(metrics_path, cfg.steps))
    if d.is_main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(_clean(summary), f, indent=2)
        try:
            from sppo_fast.trainer.plots import plot_runs

            plot_runs([out], out_dir=out)
        except Exception as error:  # a plot must never lose a finished run
            log(f"plotting failed: {error!r}")
        log(f"done: eval accuracy {acc_before:.3f} -> {acc:.3f} (greedy {greedy_before:.3f} -> "
            f"{greedy_after:.3f}) in {summary['wall_seconds']:.0f}s; {out}")
    return summary
