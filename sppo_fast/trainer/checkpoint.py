"""Checkpoints of a run: policy and critic weights (safetensors), optimizer and scheduler states, every
random generator's state and the step, written to a fresh directory that then replaces the old one by
renames, so that a crash mid-save leaves the previous checkpoint intact. Loading never unpickles code:
weights through safetensors, the rest through `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoint"


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: str, *, step: int, policy, critic, optimizers: dict, schedulers: dict,
                    device: torch.device, extra: dict | None = None):
    from safetensors.torch import save_model

    final = os.path.join(run_dir, CHECKPOINT_DIR)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(policy, os.path.join(tmp, "policy.safetensors"))
    if critic is not None:
        save_model(critic, os.path.join(tmp, "critic.safetensors"))
    state = {
        "step": step,
        "optimizers": {k: v.state_dict() for k, v in optimizers.items() if v is not None},
        "schedulers": {k: v.state_dict() for k, v in schedulers.items() if v is not None},
        "rng": rng_state(device),
        "extra": extra or {},
    }
    torch.save(state, os.path.join(tmp, "state.pt"))
    # Swap by renames: at every instant either `final` or `old` holds a complete checkpoint.
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str) -> str | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(run_dir, name)
        if os.path.exists(os.path.join(path, "state.pt")):
            return path
    return None


def load_checkpoint(path: str, *, policy, critic, optimizers: dict, schedulers: dict,
                    device: torch.device) -> dict:
    """Restore everything in place; returns the saved state (step, extra)."""
    from safetensors.torch import load_model

    load_model(policy, os.path.join(path, "policy.safetensors"), device=str(device))
    if critic is not None:
        load_model(critic, os.path.join(path, "critic.safetensors"), device=str(device))
    state = torch.load(os.path.join(path, "state.pt"), map_location=device, weights_only=True)
    for name, opt in optimizers.items():
        if opt is not None:
            opt.load_state_dict(state["optimizers"][name])
    for name, sched in schedulers.items():
        if sched is not None:
            sched.load_state_dict(state["schedulers"][name])
    rng = state["rng"]
    rng["torch"] = rng["torch"].cpu()
    if "cuda" in rng:
        rng["cuda"] = rng["cuda"].cpu()
    set_rng_state(rng, device)
    return state
