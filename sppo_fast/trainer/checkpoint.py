"""Checkpoints of a run: policy and critic weights (safetensors), optimizer and scheduler states, every
rank's random generator states and the step, written to a fresh directory that then replaces the old one
by renames, so that a crash mid-save leaves the previous checkpoint intact. Loading never unpickles code:
weights through safetensors, the rest through `torch.load(weights_only=True)`.

Saving is split in two: every rank calls `gather_training_state` (a collective when the policy is sharded
by FSDP2, which must hand out full tensors), then the main rank calls `save_checkpoint`."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from sppo_fast.trainer.config import UserError

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
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _is_sharded(module) -> bool:
    """Whether FSDP2 manages part of `module` (its parameters may be unsharded at this instant), or tensor
    parallelism split some of its parameters (DTensors): saving then gathers full tensors, loading splits them."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def model_state(module) -> dict:
    """Full (unsharded) weights on CPU; a collective when FSDP2 shards the module."""
    if _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def optimizer_state(module, opt) -> dict:
    if _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def all_rng_states(device, world_size: int) -> list:
    """Every rank's generators (each rank samples its own responses), gathered to every rank."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    out = [None] * world_size
    dist.all_gather_object(out, mine)
    return out


def gather_training_state(*, step, policy, critic, optimizers: dict, schedulers: dict, device, world_size,
                          extra=None) -> dict:
    """Everything a checkpoint holds, as CPU tensors and plain containers. Call on every rank."""
    modules = {"policy": policy, "critic": critic}
    return {
        "weights": {name: model_state(m) for name, m in modules.items() if m is not None},
        "state": {
            "step": step,
            "optimizers": {name: optimizer_state(modules[name], opt)
                           for name, opt in optimizers.items() if opt is not None},
            "schedulers": {k: v.state_dict() for k, v in schedulers.items() if v is not None},
            "rng": all_rng_states(device, world_size),
            "extra": extra or {},
        },
    }


def save_checkpoint(run_dir: str, gathered: dict) -> str:
    """Write what `gather_training_state` returned (main rank only)."""
    from safetensors.torch import save_file

    final = os.path.join(run_dir, CHECKPOINT_DIR)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, weights in gathered["weights"].items():
        # Clone so that tied weights (one storage under two names) save as two plain tensors.
        save_file({k: v.contiguous().clone() for k, v in weights.items()},
                  os.path.join(tmp, f"{name}.safetensors"))
    torch.save(gathered["state"], os.path.join(tmp, "state.pt"))
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


def _damaged(path: str, error: BaseException) -> UserError:
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    return UserError(f"resume: {path} cannot be read ({type(error).__name__}: {reason}): the checkpoint is damaged "
                     f"(start again with --overwrite, or restore the file)")


def _read_weights(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise UserError(f"resume: {path} is missing: the checkpoint is damaged (start again with --overwrite)")
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - whatever safetensors says, the file is not a checkpoint
        raise _damaged(path, error) from None


def _read_state(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"resume: {path} is missing: the checkpoint is damaged (start again with --overwrite)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: unpickling errors of every kind
        raise _damaged(path, error) from None
    if not isinstance(state, dict) or not {"step", "optimizers", "rng"} <= set(state):
        raise UserError(f"resume: {path} is not a training state (no step, optimizers, rng): the checkpoint is "
                        "damaged")
    return state


def verify_checkpoint(path: str, modules: dict):
    """Read every file of the checkpoint in `path` and check that its weights fit `modules` (name -> module
    or None), before a resumed run writes or trains anything: UserError naming the missing, damaged or
    mismatching file."""
    for name, module in modules.items():
        if module is None:
            continue
        file = os.path.join(path, f"{name}.safetensors")
        saved = _read_weights(file)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in saved.items()}
        if expected != got:
            diff = sorted(set(expected) ^ set(got))
            detail = (f"tensors {', '.join(diff[:3])} are not in both" if diff else
                      "; ".join(f"{k}: {got[k]} saved, {expected[k]} now" for k in expected if expected[k] != got[k]
                                )[:300])
            raise UserError(f"resume: {file} does not fit the model of this configuration (were model fields "
                            f"changed?): {detail}")
    _read_state(os.path.join(path, "state.pt"))


def _load_weights(module, path, device):
    weights = _read_weights(path)
    try:
        if _is_sharded(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))
        else:
            module.load_state_dict({k: v.to(device) for k, v in weights.items()})
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UserError(f"resume: {path} does not fit the model of this configuration (were model fields "
                        f"changed?): {' '.join(first[:3])[:300]}") from None


def _load_optimizer(module, opt, state):
    if _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def load_checkpoint(path: str, *, policy, critic, optimizers: dict, schedulers: dict, device, rank=0) -> dict:
    """Restore everything in place (on every rank); returns the saved state (step, extra)."""
    modules = {"policy": policy, "critic": critic}
    for name, module in modules.items():
        if module is not None:
            _load_weights(module, os.path.join(path, f"{name}.safetensors"), device)
    state = _read_state(os.path.join(path, "state.pt"))
    for name, opt in optimizers.items():
        if opt is not None:
            _load_optimizer(modules[name], opt, state["optimizers"][name])
    for name, sched in schedulers.items():
        if sched is not None:
            sched.load_state_dict(state["schedulers"][name])
    rngs = state["rng"]
    if len(rngs) <= rank:
        raise UserError(f"resume: the checkpoint holds {len(rngs)} rank(s) of generator state; this is rank "
                         f"{rank} (resume with the same number of processes)")
    set_rng_state(rngs[rank], device)
    return state
