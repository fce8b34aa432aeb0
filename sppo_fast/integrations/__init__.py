"""Glue for the models and trainers people already use. Each submodule imports its peer package
itself, so `import sppo_fast` (and this package) works without any of them:

    sppo_fast.integrations.hf     any `transformers` causal LM: log-probs and the policy loss from the
                                  decoder's hidden states and the output embedding, never the logits
    sppo_fast.integrations.trl    TRL's GRPOTrainer with its loss through sppo-fast (chunked log-probs from
                                  hidden states x lm_head, then policy_loss), and SPPO for TRL
    sppo_fast.integrations.verl   sppo-fast's estimators and losses in verl's registries, and a
                                  FusedLinearForPPO stand-in
"""
