"""The one configuration of `sppo-fast train`: a dataclass whose field metadata is the `--help` text.

Load order: dataclass defaults < `--config FILE.yaml|json` < `--field value` on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass, field

ALGOS = ("sppo", "grpo", "dapo", "dr_grpo", "rloo", "gspo", "sspo", "ppo")
# Algorithms whose advantage needs several samples of the same prompt.
GROUP_ALGOS = ("grpo", "dapo", "dr_grpo", "rloo", "gspo", "sspo")
LOSS_IMPLS = ("fused_linear", "fused", "eager", "compile")


def _f(default, help_text, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


# The level `task_difficulty=0` stands for, per task (countdown and jsonl have no levels).
TASK_DEFAULT_DIFFICULTY = {"arithmetic": 3, "long_arithmetic": 2}


@dataclass
class TrainConfig:
    # --- what to train ---
    algo: str = _f("sppo", "RL algorithm: " + ", ".join(ALGOS) + ". Its loss preset follows docs/api.md §4.",
                   choices=ALGOS)
    task: str = _f("arithmetic", "task: arithmetic, countdown, long_arithmetic (worked solutions of hundreds "
                                 "to thousands of tokens), or jsonl (with --task_path)")
    task_difficulty: int = _f(0, "difficulty level of arithmetic (1-3) or long_arithmetic (1-3); 0: the task's "
                                 "default, 3 for arithmetic and 2 for long_arithmetic. Arithmetic 3 is the main "
                                 "job's: after the warm start, answering (3+5)*2-4 in one go is right 6-15%% of "
                                 "the time and working its three steps out 60-88%%, so RL gains by learning to "
                                 "reason. At 2 the bare answers were right 54-67%% and the gain hinged on the seed")
    task_path: str | None = _f(None, "JSONL file of {prompt, answer[, solution]} records for --task jsonl")
    # --- models ---
    model: str | None = _f(None, "local Hugging Face causal-LM directory (offline); default: a tiny "
                                 "Llama-style model built from the fields below with a local char tokenizer")
    hidden_size: int = _f(128, "tiny policy: hidden size")
    num_layers: int = _f(4, "tiny policy: number of decoder layers")
    num_heads: int = _f(4, "tiny policy: attention heads")
    intermediate_size: int = _f(0, "tiny policy: MLP width (0 means 4 x hidden_size)")
    critic_hidden_size: int = _f(64, "critic (SPPO prompt critic / PPO token critic): hidden size")
    critic_layers: int = _f(2, "critic: number of decoder layers")
    critic_heads: int = _f(2, "critic: attention heads")
    attn_implementation: str = _f("auto", "attention: auto (flash_attention_2 when installed on a GPU, "
                                          "else sdpa), sdpa or eager")
    # --- warm start (supervised fine-tuning on the task's worked solutions, cached on disk) ---
    warm_start: bool = _f(True, "run (or load from the cache) the supervised warm start before RL")
    sft_steps: int = _f(1500, "warm start: optimizer steps. Too few leave the warm start still learning to copy "
                              "the operands from the prompt, which seeds do at different times: at 1000 steps "
                              "one seed in three worked the steps out right 32%% of the time, at 1500 88%%")
    sft_batch_size: int = _f(64, "warm start: examples per step")
    sft_lr: float = _f(3e-3, "warm start: peak learning rate (cosine decay, 5%% warmup)")
    sft_direct_fraction: float = _f(0.5, "warm start: fraction of examples whose target is only the final "
                                         "answer line, without the worked steps (the warm-start policy then "
                                         "mostly answers directly; RL discovers that working it out pays)")
    sft_examples: int = _f(20000, "warm start: distinct training examples drawn from the task")
    cache_dir: str | None = _f(None, "warm-start cache directory (default $SPPO_FAST_CACHE or "
                                     "~/.cache/sppo-fast)")
    # --- RL loop ---
    steps: int = _f(80, "RL steps (one rollout batch and its update per step)")
    rollouts_per_step: int = _f(256, "responses sampled per step over all ranks (prompts x samples)")
    samples_per_prompt: int = _f(0, "responses per prompt (0: 1 for sppo and ppo, 8 for the group "
                                    "algorithms)")
    critic_warmup_steps: int = _f(5, "first RL steps that train only the critic (the policy waits), so that the "
                                     "first advantages are not taken against an untrained critic")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    mini_batches: int = _f(2, "optimizer steps per pass (the batch is split into this many parts)")
    lr: float = _f(3e-4, "policy learning rate (AdamW)")
    critic_lr: float = _f(3e-3, "critic learning rate (AdamW)")
    adam_eps: float = _f(1e-5, "AdamW epsilon (larger values stop Adam from inflating the tiny, noisy gradients "
                               "of rarely used rows, e.g. of lm_head, to full learning-rate steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup: constant, cosine or linear",
                          choices=("constant", "cosine", "linear"))
    warmup_steps: int = _f(0, "RL steps of linear learning-rate warmup")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (and of the loss' log-probs)")
    max_new_tokens: int = _f(40, "longest response (the longest worked solution of the default task is 35 "
                                 "tokens with its EOS); longer ones are cut and counted as truncated")
    clip_low: float | None = _f(None, "override the preset's clip_low")
    clip_high: float | None = _f(None, "override the preset's clip_high")
    kl_coef: float = _f(0.0, "KL penalty to the warm-start policy (0: no reference model)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    gamma: float = _f(1.0, "PPO: GAE discount")
    lam: float = _f(1.0, "PPO: GAE lambda")
    chunk_size: int | None = _f(None, "rows per chunk of the fused linear loss (None: the library's choice)")
    # --- evaluation, logging, checkpoints ---
    eval_examples: int = _f(512, "held-out test examples per evaluation")
    eval_every: int = _f(20, "evaluate every this many RL steps (and always before and after)")
    eval_temperature: float = _f(1.0, "evaluation sampling temperature (0: greedy); 1.0 measures the policy RL "
                                             "optimizes, and greedy accuracy is reported next to it")
    save_every: int = _f(50, "checkpoint every this many steps (and at the end; 0: only at the end)")
    seed: int = _f(0, "random seed of everything (models, data, sampling)")
    parallel: str = _f("auto", "under torchrun: ddp, fsdp2 (decoder layers sharded with fully_shard) or auto "
                               "(fsdp2 on GPUs where available, ddp otherwise)", choices=("auto", "ddp", "fsdp2"))
    device: str = _f("auto", "auto (cuda when available), cpu or cuda")
    threads: int = _f(0, "torch CPU threads (0: torch's default, one per core). A run alone on 2 cores "
                         "warm-starts 1.5x faster with both; runs that share the cores should take 1 each "
                         "(compare does), since OpenMP threads that spin on shared cores slow every small op "
                         "down by orders of magnitude")
    out: str | None = _f(None, "run directory (default runs/<algo>-<timestamp>)")
    progress: bool = _f(True, "show a progress bar")
    # --- long chain-of-thought at real vocabulary sizes (issue 10) ---
    vocab_size: int = _f(0, "tiny policy: rows of its embedding and output layer (0: the tokenizer's size, 100 "
                            "for the char tokenizer). A real model's size (151936 as Qwen2.5/Qwen3, 128256 as "
                            "Llama 3) makes the logits as large as theirs; the ids the tokenizer lacks are "
                            "ordinary outputs that the warm start learns away, and decoding shows a sampled "
                            "one as U+FFFD, so a verifier never reads it as part of an answer")
    max_positions: int = _f(512, "tiny policy and critic: max_position_embeddings; the longest prompt plus "
                                 "max_new_tokens must fit in it (checked before training)")
    loss_impl: str = _f("fused_linear", "policy loss of the update: fused_linear (fused_linear_policy_loss on "
                                        "hidden states x lm_head, never holding the logits), fused (logits "
                                        "materialised, then fused_policy_loss), eager (log_softmax + gather + "
                                        "entropy in fp32, then policy_loss), compile (torch.compile of eager)",
                        choices=LOSS_IMPLS)
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer in the backward instead of keeping "
                                             "its activations (long responses)")

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.task_difficulty == 0:
            self.task_difficulty = TASK_DEFAULT_DIFFICULTY.get(self.task, 0)
        if self.algo not in ALGOS:
            raise ValueError(f"algo: unknown {self.algo!r}; choose one of {', '.join(ALGOS)}")
        for name in ("steps", "rollouts_per_step", "ppo_epochs", "mini_batches", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 0:
            raise ValueError(f"samples_per_prompt must be >= 0, got {self.samples_per_prompt}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.validate_long_cot()
        if self.rollouts_per_step % self.group_size:
            raise ValueError(f"rollouts_per_step ({self.rollouts_per_step}) must be a multiple of "
                             f"samples_per_prompt ({self.group_size})")

    def validate_long_cot(self):
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl: unknown {self.loss_impl!r}; choose one of {', '.join(LOSS_IMPLS)}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0 (0: the tokenizer's size), got {self.vocab_size}")
        if self.max_positions < 2:
            raise ValueError(f"max_positions must be >= 2, got {self.max_positions}")

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
    """A YAML or JSON mapping of field -> value."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of field names to values")
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


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")
