"""Cases run on every rank of a tests/rank_pool.py pool. Every rank builds the same whole problem from a
seed, runs the unsplit call itself (same dtype, and the fp64 oracle), runs its share of the split call,
and returns the largest errors for the test to judge (docs/api.md §5: the split call's error against
fp64 at most the unsplit call's plus the dtype's tolerance)."""

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import sppo_fast

GROUPS = {}


def setup(world):
    """The groups of the cases: the world; on 4 ranks also a 2 x 2 mesh (context x vocabulary)."""
    GROUPS["world"] = dist.group.WORLD
    GROUPS["mesh"] = init_device_mesh("cpu", (world,))
    GROUPS["other"] = dist.new_group(list(range(world)))  # the same ranks, not the mesh's group
    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
        GROUPS["tp"], GROUPS["cp"] = mesh.get_group("tp"), mesh.get_group("cp")


def _problem(spec):
    """The whole batch of a case, the same on every rank."""
    g = torch.Generator().manual_seed(spec["seed"])
    B, T, H, V = spec["B"], spec["T"], spec["H"], spec["V"]
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * spec.get("scale", 1.0)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) if spec.get("bias") else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > spec.get("masked", 0.2)
    if spec.get("all_masked_row"):
        mask[0] = False
    logits = hidden @ weight.T + (0 if bias is None else bias)
    old_logp = sppo_fast.token_logprobs(logits, targets) + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    newline = torch.rand(B, T, generator=g) < 0.3
    segments = sppo_fast.segment_ids(newline.long(), [1], mask=mask)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, old_logp=old_logp,
                advantages=advantages, segment_ids=segments, logits=logits)


def _dtype(spec):
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[spec["dtype"]]


def _run(spec, pr, *, hidden, weight, bias, logits, targets, mask, old_logp, advantages, segment_ids, dtype,
         cu_seqlens=None, **parallel):
    """One call of spec["op"]: (loss or None, logp, entropy, {name: gradient})."""
    config = sppo_fast.PolicyLossConfig.preset(spec["preset"], entropy_coef=spec.get("entropy_coef", 0.0))
    seg = segment_ids if config.needs_segments else None
    leaves = {}

    def leaf(name, x):
        if x is None:
            return None
        x = x.to(dtype).detach().requires_grad_(True)
        leaves[name] = x
        return x

    op, temperature = spec["op"], spec.get("temperature", 1.0)
    if op == "linear":
        out = sppo_fast.fused_linear_policy_loss(
            leaf("hidden", hidden), leaf("weight", weight), targets, old_logp, advantages, mask, config,
            bias=leaf("bias", bias), segment_ids=seg, temperature=temperature, chunk_size=spec.get("chunk"),
            cu_seqlens=cu_seqlens, **parallel)
        loss, logp, entropy, _ = out
    elif op == "logits":
        out = sppo_fast.fused_policy_loss(leaf("logits", logits), targets, old_logp, advantages, mask, config,
                                          segment_ids=seg, temperature=temperature, cu_seqlens=cu_seqlens,
                                          inplace_backward=spec.get("inplace", False), **parallel)
        loss, logp, entropy, _ = out
    elif op == "policy_loss":
        vocab = {k: parallel.pop(k) for k in ("process_group", "vocab_start") if k in parallel}
        lp, ent = sppo_fast.token_logprobs(leaf("logits", logits), targets, return_entropy=True, **vocab)
        out = sppo_fast.policy_loss(lp, old_logp, advantages, mask, config, segment_ids=seg, entropy=ent,
                                    cu_seqlens=cu_seqlens, **parallel)
        loss, logp, entropy, _ = out
    elif op == "linear_logprobs":
        ignore = torch.where(mask, targets, torch.full_like(targets, -100))
        logp, entropy = sppo_fast.linear_logprobs(leaf("hidden", hidden), leaf("weight", weight), ignore,
                                                  bias=leaf("bias", bias), temperature=temperature,
                                                  return_entropy=True, chunk_size=spec.get("chunk"), **parallel)
        loss = (logp * pr["w1"]).sum() + (entropy * pr["w2"]).sum()
    else:  # token_logprobs
        ignore = torch.where(mask, targets, torch.full_like(targets, -100))
        logp, entropy = sppo_fast.token_logprobs(leaf("logits", logits), ignore, temperature=temperature,
                                                 return_entropy=True, **parallel)
        loss = (logp * pr["w1"]).sum() + (entropy * pr["w2"]).sum()
    loss.backward()
    return loss.detach().double(), logp.detach().double(), entropy.detach().double(), \
        {k: v.grad.double() for k, v in leaves.items() if v.grad is not None}


def _vocab_slice(name, x, a, b):
    """The rank's part of an input or gradient that is split by vocabulary."""
    if x is None:
        return None
    return x[a:b] if name in ("weight", "bias") else x[..., a:b] if name == "logits" else x


def _error(x, ref):
    return float((x - ref).abs().max()) / max(1.0, float(ref.abs().max())) if ref.numel() else 0.0


def vocab_case(spec, group_name="world"):
    """Vocabulary-parallel: each rank holds spec["sizes"][rank] ids; errors of the split and unsplit calls
    against the fp64 oracle, per output."""
    group = GROUPS[group_name]
    rank = dist.get_rank(group)
    pr = _problem(spec)
    pr["w1"] = torch.randn(pr["targets"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pr["w2"] = torch.randn(pr["targets"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = sum(spec["sizes"][:rank])
    b = a + spec["sizes"][rank]
    dtype = _dtype(spec)
    inputs = {k: pr[k] for k in ("hidden", "weight", "bias", "logits", "targets", "mask", "old_logp", "advantages",
                                 "segment_ids")}
    oracle = _run(spec, pr, **inputs, dtype=torch.float64)
    whole = _run(spec, pr, **inputs, dtype=dtype)
    local = {k: _vocab_slice(k, v, a, b) for k, v in inputs.items()}
    if spec.get("dtensor"):
        mesh = GROUPS["mesh"]
        dim = -1 if spec["op"] in ("logits", "token_logprobs", "policy_loss") else 0
        split = _run_dtensor(spec, pr, inputs, dtype, mesh, dim)
    else:
        parallel = dict(process_group=group, vocab_start=a if spec.get("give_start", True) else None)
        split = _run(spec, pr, **local, dtype=dtype, **parallel)
    names = ("loss", "logp", "entropy")
    out = {}
    for i, name in enumerate(names):
        if split[i] is not None:
            out[name] = (_error(split[i], oracle[i]), _error(whole[i], oracle[i]))
    for name, grad in split[3].items():
        ref = _vocab_slice(name, oracle[3][name], a, b)
        out["grad_" + name] = (_error(grad, ref), _error(_vocab_slice(name, whole[3][name], a, b), ref))
    return out


def _run_dtensor(spec, pr, inputs, dtype, mesh, dim):
    """The split call with the weight (or logits) a DTensor sharded on its vocabulary dim."""
    name = "weight" if dim == 0 else "logits"
    full = inputs[name].to(dtype)
    dt = distribute_tensor(full, mesh, [Shard(dim % full.dim())]).detach().requires_grad_(True)
    config = sppo_fast.PolicyLossConfig.preset(spec["preset"])
    h = inputs["hidden"].to(dtype).detach().requires_grad_(True)
    if name == "weight":
        res = sppo_fast.fused_linear_policy_loss(h, dt, inputs["targets"], inputs["old_logp"], inputs["advantages"],
                                                 inputs["mask"], config)
    else:
        res = sppo_fast.fused_policy_loss(dt, inputs["targets"], inputs["old_logp"], inputs["advantages"],
                                          inputs["mask"], config)
    res.loss.backward()
    grads = {name: dt.grad.to_local().double()}
    if name == "weight":
        grads["hidden"] = h.grad.double()
    return res.loss.detach().double(), res.logp.double(), res.entropy.double(), grads


def _split_rows(x, spec, rank, P, packed_lengths):
    """This rank's slice of every sequence of a (B, T, ...) tensor: padded, the columns of spec["widths"];
    packed, the rank's part of each sequence (spec["parts"][s][rank] tokens), concatenated."""
    if packed_lengths is None:
        a = sum(spec["widths"][:rank])
        return x[:, a:a + spec["widths"][rank]]
    pieces = []
    for s in range(len(packed_lengths)):
        parts = spec["parts"][s]
        a = sum(parts[:rank])
        pieces.append(x[s, a:a + parts[rank]])
    return torch.cat(pieces)


def context_case(spec):
    """Context-parallel (and, on the 2 x 2 mesh, vocabulary-parallel too): errors of this rank's outputs
    and gradients against the unsplit call's, and of the weight gradient summed over the context group."""
    two_d = spec.get("two_d", False)
    cp = GROUPS["cp"] if two_d else GROUPS["world"]
    rank, P = dist.get_rank(cp), cp.size()
    pr = _problem(spec)
    dtype = _dtype(spec)
    inputs = {k: pr[k] for k in ("hidden", "weight", "bias", "logits", "targets", "mask", "old_logp", "advantages",
                                 "segment_ids")}
    packed = spec.get("parts")
    lengths = None if packed is None else [sum(p) for p in packed]
    if lengths is not None:  # sequence s keeps its first lengths[s] positions; the rest is padding
        keep = torch.arange(spec["T"]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        inputs["mask"] = inputs["mask"] & keep
        inputs["segment_ids"] = sppo_fast.segment_ids(
            (torch.rand(spec["B"], spec["T"], generator=torch.Generator().manual_seed(5)) < 0.3).long(), [1],
            mask=inputs["mask"])
    whole = _run(spec, pr, **inputs, dtype=dtype)

    def local(name, x):
        if x is None or name in ("weight", "bias", "advantages"):
            return x
        return _split_rows(x, spec, rank, P, lengths)

    mine = {k: local(k, v) for k, v in inputs.items()}
    parallel = dict(context_parallel_group=cp)
    a = b = None
    if two_d:
        tp = GROUPS["tp"]
        r = dist.get_rank(tp)
        a = sum(spec["sizes"][:r])
        b = a + spec["sizes"][r]
        mine = {k: _vocab_slice(k, v, a, b) for k, v in mine.items()}
        parallel.update(process_group=tp, vocab_start=a)
    cu = None
    if lengths is not None:
        parts = [p[rank] for p in packed]
        cu = torch.tensor([0] + parts).cumsum(0)
    split = _run(spec, pr, **mine, dtype=dtype, cu_seqlens=cu, **parallel)
    out = {"loss": _error(split[0], whole[0])}
    out["logp"] = _error(split[1], local("logp", whole[1]))
    out["entropy"] = _error(split[2], local("entropy", whole[2]))
    for name, grad in split[3].items():
        ref = whole[3][name]
        if name in ("weight", "bias"):
            grad = grad.clone()
            dist.all_reduce(grad, group=cp)
        else:
            ref = local(name, ref)
        if two_d:
            ref = _vocab_slice(name, ref, a, b)
        out["grad_" + name] = _error(grad, ref)
    return out


def bad_case(kind):
    """One bad argument (on one rank, or the same on all); each rank returns nothing or raises."""
    group = GROUPS["world"]
    rank, P = dist.get_rank(group), group.size()
    spec = dict(seed=3, B=2, T=4, H=8, V=11, preset="dapo", op="linear")
    pr = _problem(spec)
    config = sppo_fast.PolicyLossConfig.preset("dapo")
    sizes = [11 // P + (1 if r < 11 % P else 0) for r in range(P)]
    a = sum(sizes[:rank])
    weight = pr["weight"][a:a + sizes[rank]].float()
    hidden, targets, mask = pr["hidden"].float(), pr["targets"], pr["mask"]
    start = a
    if kind == "overlap" and rank == 1:
        start = a - 1
    if kind == "start_on_one_rank":
        start = a if rank == 0 else None
    if kind == "target_out":
        targets = targets.clone()
        targets[0, 0] = 11
    if kind == "mask_shape" and rank == 1:
        mask = mask[:, :3]
    if kind == "hidden_differs":
        os.environ["SPPO_FAST_DEBUG"] = "1"
        hidden = hidden + (rank == 1) * 1e-3
    try:
        if kind == "mesh_mismatch":
            sharded = distribute_tensor(pr["weight"].float(), GROUPS["mesh"], [Shard(0)])
            sppo_fast.fused_linear_policy_loss(hidden, sharded, targets, pr["old_logp"].float(),
                                               pr["advantages"].float(), mask, config, process_group=GROUPS["other"])
        elif kind.startswith("cp_"):
            logp = torch.randn(2, 2)
            old, m = torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool)
            if kind == "cp_count" and rank == 1:
                logp, old, m = torch.randn(3, 2), torch.randn(3, 2), torch.ones(3, 2, dtype=torch.bool)
            if kind == "cp_shape" and rank == 1:
                old = torch.randn(2, 3)
            ref = torch.randn(2, 2) if kind == "cp_optional" and rank == 0 else None
            sppo_fast.policy_loss(logp, old, torch.zeros(logp.shape[0]), m, config, ref_logp=ref,
                                  context_parallel_group=group)
        else:
            sppo_fast.fused_linear_policy_loss(hidden, weight, targets, pr["old_logp"].float(),
                                               pr["advantages"].float(), mask, config, process_group=group,
                                               vocab_start=start)
    finally:
        os.environ.pop("SPPO_FAST_DEBUG", None)
    return None
