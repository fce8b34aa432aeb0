"""The one configuration of `sppo-fast train`: a dataclass whose field metadata is the `--help` text.

Load order: dataclass defaults < `--config FILE.yaml|json` < `--field value` on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Algorithm:
    """One `--algo`: the library's loss preset it uses (docs/api.md §4) and what the trainer adds around it.
    Plain data (no torch), so that `--help` stays fast; sppo_fast/trainer/algorithms.py reads it."""

    preset: str                     # loss preset of docs/api.md §4
    about: str = ""                 # one line for --help and the compare report
    group: bool = False             # the advantage needs several samples per prompt (8 by default)
    advantage: str | None = None    # the trainer's advantage estimator (algorithms.py); None: the preset's
    critic: str | None = None       # None, "prompt" (SPPO's prompt critic) or "token" (PPO's token critic)
    critic_loss: str | None = None  # "bce": sigmoid(z) against the final 0/1 reward; "mse": against GAE returns
    greedy_baseline: bool = False   # also decode one greedy response per prompt, scored as a baseline (ReMax)
    loss_overrides: tuple = ()      # (field, value) pairs applied on top of the preset
    clip: str | None = "token"      # scale of the clip range: "token" (around 0.2), "sequence" (GSPO, ~1e-4)


# The one table of algorithms (like verl's core_algos registries): a new algorithm or ablation is a row here,
# plus an advantage estimator in algorithms.py if it needs a new one.
ALGORITHMS: dict[str, Algorithm] = {
    "sppo": Algorithm("sppo", "one sample per prompt; A = R - sigmoid(z) of a prompt critic trained with BCE",
                      critic="prompt", critic_loss="bce"),
    "grpo": Algorithm("grpo", "group baseline (R - mean) / std", group=True),
    "dapo": Algorithm("dapo", "GRPO's advantage, clip-higher 0.28, token-mean", group=True),
    "dr_grpo": Algorithm("dr_grpo", "group baseline R - mean, constant length norm", group=True),
    "rloo": Algorithm("rloo", "leave-one-out group baseline", group=True),
    "gspo": Algorithm("gspo", "sequence-level ratio and clip (3e-4 / 4e-4)", group=True, clip="sequence"),
    "sspo": Algorithm("sspo", "segment-level ratio, entropy-adaptive clip", group=True),
    "ppo": Algorithm("ppo", "token critic regressed on GAE returns", critic="token", critic_loss="mse"),
    "remax": Algorithm("rloo", "one sample per prompt; A = R - R(greedy response to the same prompt); RLOO's "
                               "loss (token-level PPO clip, token-mean)", advantage="remax", greedy_baseline=True),
    "ppo_bce": Algorithm("ppo", "ablation: PPO whose token critic is trained with SPPO's BCE on the final reward "
                                "(V = sigmoid(z)) instead of regressing the GAE returns", critic="token",
                         critic_loss="bce"),
    "sspo_noadapt": Algorithm("sspo", "ablation: SSPO without entropy-adaptive clipping (entropy_adaptive=None)",
                              group=True, loss_overrides=(("entropy_adaptive", None),)),
}
ALGOS = tuple(ALGORITHMS)
# Algorithms whose advantage needs several samples of the same prompt.
GROUP_ALGOS = tuple(name for name, a in ALGORITHMS.items() if a.group)
LOSS_IMPLS = ("fused_linear", "fused", "eager", "compile", "torch_lce")
TASKS = ("arithmetic", "countdown", "long_arithmetic", "jsonl")
# Levels of the tasks that have them (tests/test_cli_bad_input.py checks them against the tasks' own).
TASK_LEVELS = {"arithmetic": (1, 2, 3), "long_arithmetic": (1, 2, 3)}


class UserError(ValueError):
    """Bad input from the user (a flag, a config file, a run directory, a data file): the command prints its
    message as one line and exits 2; anything else is a bug and keeps its traceback."""


def _f(default, help_text, **kw):
    """A field of the table: its default, its `--help` text and what it takes, which both `--help` and the
    validation read: `min` / `max` (inclusive), `gt` (exclusive lower bound), `choices`, `path` (a non-empty
    path string)."""
    return field(default=default, metadata={"help": help_text, **kw})


# The level `task_difficulty=0` stands for, per task (countdown and jsonl have no levels).
TASK_DEFAULT_DIFFICULTY = {"arithmetic": 3, "long_arithmetic": 2}


@dataclass
class TrainConfig:
    # --- what to train ---
    algo: str = _f("sppo", "RL algorithm: " + ", ".join(ALGOS) + ". Its loss preset follows docs/api.md §4; "
                           "remax (greedy-response baseline, rloo's loss), ppo_bce (PPO with a BCE-trained token "
                           "critic) and sspo_noadapt (SSPO without entropy-adaptive clipping) are the trainer's "
                           "own, on the rloo, ppo and sspo presets", choices=ALGOS)
    task: str = _f("arithmetic", "task: arithmetic, countdown, long_arithmetic (worked solutions of hundreds "
                                 "to thousands of tokens), or jsonl (with --task_path)", choices=TASKS)
    task_difficulty: int = _f(0, "difficulty level of arithmetic (1-3) or long_arithmetic (1-3); 0: the task's "
                                 "default, 3 for arithmetic and 2 for long_arithmetic. Arithmetic 3 is the main "
                                 "job's: after the warm start, answering (3+5)*2-4 in one go is right 6-15%% of "
                                 "the time and working its three steps out 60-88%%, so RL gains by learning to "
                                 "reason. At 2 the bare answers were right 54-67%% and the gain hinged on the seed",
                              min=0)
    task_path: str | None = _f(None, "JSONL file of {prompt, answer[, solution]} records for --task jsonl", path=True)
    # --- models ---
    model: str | None = _f(None, "local Hugging Face causal-LM directory (offline); default: a tiny "
                                 "Llama-style model built from the fields below with a local char tokenizer",
                               path=True)
    hidden_size: int = _f(128, "tiny policy: hidden size", min=1)
    num_layers: int = _f(4, "tiny policy: number of decoder layers", min=1)
    num_heads: int = _f(4, "tiny policy: attention heads", min=1)
    intermediate_size: int = _f(0, "tiny policy: MLP width (0 means 4 x hidden_size)", min=0)
    critic_hidden_size: int = _f(64, "critic (SPPO prompt critic / PPO token critic): hidden size", min=1)
    critic_layers: int = _f(2, "critic: number of decoder layers", min=1)
    critic_heads: int = _f(2, "critic: attention heads", min=1)
    attn_implementation: str = _f("auto", "attention: auto (flash_attention_2 when installed on a GPU, "
                                          "else sdpa), sdpa or eager", choices=("auto", "sdpa", "eager"))
    # --- warm start (supervised fine-tuning on the task's worked solutions, cached on disk) ---
    warm_start: bool = _f(True, "run (or load from the cache) the supervised warm start before RL")
    sft_steps: int = _f(1300, "warm start: optimizer steps. Too few leave the warm start still learning to copy "
                              "the operands from the prompt, which seeds do at different times: at 1000 steps "
                              "one seed in three worked the steps out right 32%% of the time, at 1500 88%%. "
                              "1300 (was 1500) for the 5-minute budget: 169-212 s cold on 2 AMD EPYC cores "
                              "(210-258 s on an Intel Xeon), every seed of five then gained +25 to +41 points; "
                              "at 1200 one seed of four gained only +22 (docs/default-run/)", min=1)
    sft_batch_size: int = _f(64, "warm start: examples per step", min=1)
    sft_lr: float = _f(3e-3, "warm start: peak learning rate (cosine decay, 5%% warmup)", gt=0)
    sft_direct_fraction: float = _f(0.5, "warm start: fraction of examples whose target is only the final "
                                         "answer line, without the worked steps (the warm-start policy then "
                                         "mostly answers directly; RL discovers that working it out pays)",
                                         min=0, max=1)
    sft_examples: int = _f(20000, "warm start: distinct training examples drawn from the task", min=1)
    cache_dir: str | None = _f(None, "warm-start cache directory (default $SPPO_FAST_CACHE or "
                                     "~/.cache/sppo-fast)", path=True)
    # --- RL loop ---
    steps: int = _f(40, "RL steps (one rollout batch and its update per step). 40 (was 80): most of the default "
                        "run's gain comes in the first 20 (accuracy at steps 20 and 40 within 0-5 points on "
                        "five seeds, docs/default-run/), at 1.5-1.7 s a step on 2 cores", min=1)
    rollouts_per_step: int = _f(256, "responses sampled per step over all ranks (prompts x samples)", min=1)
    samples_per_prompt: int = _f(0, "responses per prompt (0: 1 for sppo, ppo, ppo_bce and remax, 8 for "
                                    "the group algorithms)", min=0)
    critic_warmup_steps: int = _f(5, "first RL steps that train only the critic (the policy waits), so that the "
                                     "first advantages are not taken against an untrained critic", min=0)
    ppo_epochs: int = _f(1, "passes over each rollout batch", min=1)
    mini_batches: int = _f(2, "optimizer steps per pass (the batch is split into this many parts)", min=1)
    lr: float = _f(3e-4, "policy learning rate (AdamW)", min=0)
    critic_lr: float = _f(3e-3, "critic learning rate (AdamW)", min=0)
    adam_eps: float = _f(1e-5, "AdamW epsilon (larger values stop Adam from inflating the tiny, noisy gradients "
                               "of rarely used rows, e.g. of lm_head, to full learning-rate steps)", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)", min=0)
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup: constant, cosine or linear",
                          choices=("constant", "cosine", "linear"))
    warmup_steps: int = _f(0, "RL steps of linear learning-rate warmup", min=0)
    temperature: float = _f(1.0, "sampling temperature of the rollouts (and of the loss' log-probs)", gt=0)
    max_new_tokens: int = _f(40, "longest response (the longest worked solution of the default task is 35 "
                                 "tokens with its EOS); longer ones are cut and counted as truncated", min=1)
    old_logprobs: str = _f("auto", "where the old log-probs of the loss' ratio come from: sampler (the "
                                   "log-softmax of the logits each token was sampled from, at the sampling "
                                   "temperature; no extra forward pass), recompute (a forward pass over the "
                                   "rollout batch before any update), or auto (sampler in fp32, recompute "
                                   "under bf16 autocast on a GPU, where the cached decode and a full forward "
                                   "round apart). Recomputing them was 17%% of an RL step of the default run on CPU; "
                                   "the two agree to 1e-6 in fp32",
                           choices=("auto", "sampler", "recompute"))
    clip_low: float | None = _f(None, "override the preset's clip_low", min=0)
    clip_high: float | None = _f(None, "override the preset's clip_high", min=0)
    kl_coef: float = _f(0.0, "KL penalty to the warm-start policy (0: no reference model)", min=0)
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    gamma: float = _f(1.0, "PPO: GAE discount", min=0, max=1)
    lam: float = _f(1.0, "PPO: GAE lambda", min=0, max=1)
    chunk_size: int | None = _f(None, "rows per chunk of the fused linear loss (None: the library's choice)", min=1)
    # --- evaluation, logging, checkpoints ---
    eval_examples: int = _f(512, "held-out test examples per evaluation", min=1)
    eval_every: int = _f(20, "evaluate every this many RL steps (and always before and after)", min=1)
    eval_temperature: float = _f(1.0, "evaluation sampling temperature (0: greedy); 1.0 measures the policy RL "
                                             "optimizes, and greedy accuracy is reported next to it", min=0)
    save_every: int = _f(50, "checkpoint every this many steps (and at the end; 0: only at the end)", min=0)
    seed: int = _f(0, "random seed of everything (models, data, sampling)", min=0)
    parallel: str = _f("auto", "under torchrun: ddp, fsdp2 (decoder layers sharded with fully_shard) or auto "
                               "(fsdp2 on GPUs where available, ddp otherwise)", choices=("auto", "ddp", "fsdp2"))
    tensor_parallel: int = _f(1, "under torchrun: split lm_head (and the input embedding) by vocabulary over "
                                 "this many ranks, as DTensors over a 1-D device mesh (ColwiseParallel / "
                                 "RowwiseParallel); the loss then runs fused_linear_policy_loss on the sharded "
                                 "weight. Every rank sees the same batch (tensor-parallel ranks are not data "
                                 "parallel); for now it must equal the world size (no data parallel next to it) "
                                 "and loss_impl must be fused_linear. Context parallelism is not offered: the "
                                 "tiny models' attention cannot run ring or Ulysses attention on CPU here", min=1)
    device: str = _f("auto", "auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch CPU threads (0: torch's default, one per core). A run alone on 2 cores "
                         "warm-starts 1.5x faster with both; runs that share the cores should take 1 each "
                         "(compare does), since OpenMP threads that spin on shared cores slow every small op "
                         "down by orders of magnitude", min=0)
    out: str | None = _f(None, "run directory (default runs/<algo>-<timestamp>)", path=True)
    progress: bool = _f(True, "show a progress bar")
    # --- long chain-of-thought at real vocabulary sizes (issue 10) ---
    vocab_size: int = _f(0, "tiny policy: rows of its embedding and output layer (0: the tokenizer's size, 100 "
                            "for the char tokenizer). A real model's size (151936 as Qwen2.5/Qwen3, 128256 as "
                            "Llama 3) makes the logits as large as theirs; the ids the tokenizer lacks are "
                            "ordinary outputs that the warm start learns away, and decoding shows a sampled "
                            "one as U+FFFD, so a verifier never reads it as part of an answer", min=0)
    max_positions: int = _f(512, "tiny policy and critic: max_position_embeddings; the longest prompt plus "
                                 "max_new_tokens must fit in it (checked before training)", min=2)
    loss_impl: str = _f("fused_linear", "policy loss of the update: fused_linear (fused_linear_policy_loss on "
                                        "hidden states x lm_head, never holding the logits), fused (logits "
                                        "materialised, then fused_policy_loss), eager (log_softmax + gather + "
                                        "entropy in fp32, then policy_loss), compile (torch.compile of eager), "
                                        "torch_lce (PyTorch's chunked F.linear_cross_entropy, then policy_loss; "
                                        "no entropy, so no entropy metric, bonus or entropy-adaptive clip)",
                        choices=LOSS_IMPLS)
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer in the backward instead of keeping "
                                             "its activations (long responses)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_field(f.name, getattr(self, f.name)))
        self.validate()

    def validate(self):
        """The checks that involve several fields (each field's own type and range: `coerce_field`)."""
        if self.task_difficulty == 0:
            self.task_difficulty = TASK_DEFAULT_DIFFICULTY.get(self.task, 0)
        levels = TASK_LEVELS.get(self.task)
        if levels is None and self.task_difficulty:
            raise ValueError(f"task_difficulty: task {self.task} has no levels (leave it 0), got "
                             f"{self.task_difficulty}")
        if levels is not None and self.task_difficulty not in levels:
            raise ValueError(f"task_difficulty: {self.task} has levels {', '.join(map(str, levels))} (0: its "
                             f"default), got {self.task_difficulty}")
        if self.task == "jsonl" and not self.task_path:
            raise ValueError("task_path: --task jsonl needs --task_path FILE.jsonl")
        if self.task != "jsonl" and self.task_path:
            raise ValueError(f"task_path: only read by --task jsonl, but task is {self.task}")
        for size, heads in (("hidden_size", "num_heads"), ("critic_hidden_size", "critic_heads")):
            if getattr(self, size) % getattr(self, heads):
                raise ValueError(f"{size} ({getattr(self, size)}) must be a multiple of {heads} "
                                 f"({getattr(self, heads)})")
        if self.max_new_tokens >= self.max_positions:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below max_positions "
                             f"({self.max_positions}), which also holds the prompt")
        if self.tensor_parallel > 1 and self.loss_impl != "fused_linear":
            raise ValueError(f"loss_impl: tensor_parallel {self.tensor_parallel} needs loss_impl fused_linear (the "
                             f"only one that takes a vocabulary-sharded lm_head), got {self.loss_impl}")
        if self.tensor_parallel > 1 and self.parallel == "fsdp2":
            raise ValueError("parallel: fsdp2 does not go with tensor_parallel > 1 (every rank holds the whole "
                             "decoder; lm_head and the embedding are split by vocabulary); use auto")
        if self.rollouts_per_step % self.group_size:
            raise ValueError(f"rollouts_per_step ({self.rollouts_per_step}) must be a multiple of "
                             f"samples_per_prompt ({self.group_size})")

    @property
    def group_size(self) -> int:
        """Responses per prompt: SPPO's point is one; the group baselines need several."""
        if self.samples_per_prompt:
            return self.samples_per_prompt
        return 8 if self.algo in GROUP_ALGOS else 1

    @property
    def prompts_per_step(self) -> int:
        return self.rollouts_per_step // self.group_size

    def resolved_out(self) -> str:
        return self.out or os.path.join("runs", f"{self.algo}-{time.strftime('%Y%m%d-%H%M%S')}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def load_config_file(path: str) -> dict:
    """A YAML (.yaml, .yml) or JSON mapping of field -> value; UserError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise UserError(f"config: cannot read {path}: {reason}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise UserError(f"config: {path} is not valid YAML{at}: {problem}") from None
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"config: {path} is not valid JSON (line {error.lineno}, column {error.colno}): "
                            f"{error.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {path}: expected a mapping of field names to values, got "
                        f"{type(data).__name__}")
    return data


def field_types() -> dict[str, type]:
    """The scalar type of each field (the `X` of `X | None`)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = args[0] if args else hint
    return out


def optional_fields() -> set[str]:
    """The fields that take None (`X | None`)."""
    hints = typing.get_type_hints(TrainConfig)
    return {name for name, hint in hints.items() if type(None) in typing.get_args(hint)}


_TYPES, _OPTIONAL, _META = None, None, None


def _table():
    global _TYPES, _OPTIONAL, _META
    if _TYPES is None:
        _TYPES, _OPTIONAL = field_types(), optional_fields()
        _META = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    return _TYPES, _OPTIONAL, _META


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe_field(name: str) -> str:
    """What field `name` takes, in words ("an integer >= 1", "one of cpu, cuda"), for --help and errors."""
    types, optional, meta = _table()
    tp, m = types[name], meta[name]
    if "choices" in m:
        text = "one of " + ", ".join(m["choices"])
    elif tp is bool:
        text = "true or false"
    elif tp is str:
        text = "a path" if m.get("path") else "a string"
    else:
        text = "an integer" if tp is int else "a number"
        bounds = []
        if "gt" in m:
            bounds.append(f"> {_number(m['gt'])}")
        if "min" in m and "max" in m:
            bounds = [f"in [{_number(m['min'])}, {_number(m['max'])}]"]
        elif "min" in m:
            bounds.append(f">= {_number(m['min'])}")
        elif "max" in m:
            bounds.append(f"<= {_number(m['max'])}")
        text += "".join(" " + b for b in bounds)
    return text + (" or none" if name in optional else "")


NONE_WORDS = ("none", "null")


def coerce_field(name: str, value):
    """`value` (from a flag, a YAML/JSON file or Python) as field `name`'s type, within its range; ValueError
    naming the field and what it takes otherwise. Strings are parsed: "false" is False, "3e-4" is 3e-4,
    "none" is None for the fields that take None."""
    types, optional, meta = _table()
    if name not in types:
        raise ValueError(f"config: unknown field {name!r}")
    tp, m = types[name], meta[name]

    def bad(reason=""):
        return ValueError(f"{name}: expected {describe_field(name)}, got {value!r}{reason}")

    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS and name in optional):
        if name in optional:
            return None
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            try:
                return parse_bool(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if m.get("path") and not value.strip():
            raise bad(" (an empty path)")
        if "choices" in m and value not in m["choices"]:
            raise bad()
        return value
    # numbers
    if isinstance(value, bool):
        raise bad()
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text) if tp is int else float(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise bad() from None
    elif isinstance(value, (int, float)):
        number = value
    else:
        raise bad()
    if not math.isfinite(number):
        raise bad()
    if tp is int:
        if isinstance(number, float):
            if not number.is_integer():
                raise bad()
            number = int(number)
    else:
        number = float(number)
    if ("min" in m and number < m["min"]) or ("max" in m and number > m["max"]) or \
            ("gt" in m and not number > m["gt"]):
        raise bad()
    return number


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")
