"""sppo-fast: fused kernels and a small trainer for reinforcement learning of reasoning LLMs with
verifiable rewards (SPPO, GRPO, DAPO, Dr. GRPO, RLOO, GSPO, SSPO, PPO). The API reference is docs/api.md."""

from .advantages import gae, group_advantage, rloo_advantage, sequence_advantage, value_bce_loss
from .api import fused_linear_policy_loss, fused_policy_loss, linear_logprobs, policy_loss, token_logprobs
from .dispatch import backend_info
from .layout import cu_seqlens_from_position_ids
from .losses import EntropyAdaptiveClip, PolicyLossConfig, PolicyLossOutput
from .segments import newline_token_ids, segment_ids

__version__ = "0.1.0"

__all__ = [
    "token_logprobs",
    "linear_logprobs",
    "segment_ids",
    "newline_token_ids",
    "PolicyLossConfig",
    "EntropyAdaptiveClip",
    "policy_loss",
    "fused_policy_loss",
    "fused_linear_policy_loss",
    "PolicyLossOutput",
    "sequence_advantage",
    "value_bce_loss",
    "group_advantage",
    "rloo_advantage",
    "gae",
    "backend_info",
    "cu_seqlens_from_position_ids",
]
