"""Policy and critics: a tiny Llama-style causal LM built from a config (or any local Hugging Face
causal-LM directory), SPPO's prompt critic (one scalar per prompt) and PPO's token critic."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn


def attention_implementation(requested: str, device: torch.device) -> str:
    """flash-attn 2 when it is installed and we are on a GPU, else PyTorch's sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_llama_config(tokenizer, *, hidden, layers, heads, intermediate=0, attn="sdpa", vocab_size=0,
                      max_positions=512):
    """`vocab_size` 0 means the tokenizer's size; a larger one adds rows no token maps to."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn
    return config


def build_policy(cfg, tokenizer, device: torch.device):
    """The policy `LlamaForCausalLM` (or the `--model` checkpoint) in fp32 on `device`."""
    attn = attention_implementation(cfg.attn_implementation, device)
    if cfg.model:
        from transformers import AutoModelForCausalLM

        # fp32 master weights; on a GPU the loop runs the forward passes under bf16 autocast.
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, local_files_only=True, attn_implementation=attn, dtype=torch.float32)
    else:
        from transformers import LlamaForCausalLM

        config = tiny_llama_config(tokenizer, hidden=cfg.hidden_size, layers=cfg.num_layers,
                                   heads=cfg.num_heads, intermediate=cfg.intermediate_size, attn=attn,
                                   **policy_sizes(cfg, tokenizer))
        model = LlamaForCausalLM(config)
    return model.to(device)


def policy_sizes(cfg, tokenizer) -> dict:
    """vocab_size and max_positions of the tiny models (policy and critic) from the config."""
    if cfg.model and cfg.vocab_size:
        raise ValueError("vocab_size: applies to the tiny policy only; --model brings its own vocabulary")
    if cfg.vocab_size and cfg.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's {len(tokenizer)} "
                         "tokens: some tokens would have no embedding row")
    return {"vocab_size": cfg.vocab_size, "max_positions": cfg.max_positions}


def enable_checkpointing(lm):
    """Recompute each decoder layer in the backward (transformers renamed the method; take either)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MODEL_DIR_NEEDS = ("config.json, the weights (model.safetensors or pytorch_model.bin, or a sharded index) and a "
                   "tokenizer (tokenizer_config.json with tokenizer.json or its vocabulary files), as "
                   "save_pretrained writes them for a model and its tokenizer")


def check_model_dir(path: str):
    """`--model` names a local directory (the trainer never downloads from a hub) holding a model and its
    tokenizer; UserError saying what is missing otherwise."""
    from sppo_fast.trainer.config import UserError

    if not os.path.exists(path):
        raise UserError(f"model: directory {path} does not exist (--model takes a local Hugging Face model "
                        "directory; the trainer never downloads from a hub)")
    if not os.path.isdir(path):
        raise UserError(f"model: {path} is not a directory; a model directory holds {MODEL_DIR_NEEDS}")
    names = set(os.listdir(path))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & set(WEIGHT_FILES) and not any(n.endswith(".safetensors") for n in names):
        missing.append("weights")
    if not names & set(TOKENIZER_FILES):
        missing.append("tokenizer files")
    if missing:
        raise UserError(f"model: {path} is not a model directory: it lacks {', '.join(missing)}; it needs "
                        f"{MODEL_DIR_NEEDS}")


def load_tokenizer(cfg):
    """The `--model` directory's tokenizer, or the local char-level one; left padding for generation."""
    if cfg.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        from sppo_fast.trainer.tokenizer import build_tokenizer

        tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them, so that a forward pass over a
    left-padded batch sees the same positions as the sampler did."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyHidden(nn.Module):
    """Wraps a causal LM so that its forward returns the decoder's last hidden states, never the logits:
    the fused loss multiplies them by `lm_head.weight` chunk by chunk. Being a module, it can be wrapped by
    DDP so that gradient synchronisation sees every parameter."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state


def lm_head_of(lm):
    """(weight, bias) of the output projection."""
    head = lm.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class PromptCritic(nn.Module):
    """SPPO's critic: a small decoder over the prompt with a scalar head read at the last prompt token;
    `sigmoid(z)` is the predicted probability that the policy answers this prompt correctly."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.body = LlamaModel(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, prompt_ids, prompt_mask):
        hidden = self.body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=False,
                           position_ids=position_ids_from_mask(prompt_mask)).last_hidden_state
        # Prompts are left-padded, so the last column is every prompt's last token.
        return self.head(hidden[:, -1]).squeeze(-1).float()


class TokenCritic(nn.Module):
    """PPO's critic: a value for every position of prompt + response."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.body = LlamaModel(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def build_critic(cfg, tokenizer, device: torch.device):
    """The critic the algorithm needs (None for the critic-free group baselines)."""
    if cfg.algo not in ("sppo", "ppo"):
        return None
    attn = attention_implementation(cfg.attn_implementation, device)
    if attn == "flash_attention_2":
        attn = "sdpa"  # the critic stays fp32, which flash-attn does not take
    # the critic reads the ids the policy samples (the PPO critic reads responses), so it gets every row too
    sizes = policy_sizes(cfg, tokenizer) if not cfg.model else {}
    config = tiny_llama_config(tokenizer, hidden=cfg.critic_hidden_size, layers=cfg.critic_layers,
                               heads=cfg.critic_heads, attn=attn, **sizes)
    critic = PromptCritic(config) if cfg.algo == "sppo" else TokenCritic(config)
    return critic.to(device)


def describe_model(model) -> dict:
    n = sum(p.numel() for p in model.parameters())
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {"name": os.path.basename(str(name)) or type(model).__name__, "parameters": n}
