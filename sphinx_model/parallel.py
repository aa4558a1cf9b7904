"""Scale-out, applied from outside the model: the only module that knows about torch.distributed.

``init_distributed()`` joins the process group that ``torchrun`` describes (NCCL on GPUs, Gloo on the
CPU), or returns a single-process description when there is none. ``parallelize(model, ...)`` then
applies, in this order (torchtitan's order, each step wrapping what the previous one produced):

1. activation checkpointing of every decoder block (``checkpoint_wrapper``: the block's activations
   are recomputed in the backward);
2. ``torch.compile`` of every decoder block (in place, so parameter names do not change);
3. FSDP2: ``fully_shard`` of every decoder block, of the frozen vision tower as one unit, then of
   the root (embeddings, projector, special vectors, final norm, LM head), with parameters gathered in
   the compute dtype and gradients reduced in float32. Gradients are reduced as sums
   (``gradient_divide_factor = 1``): the trainer already divides the loss by the number of trained
   tokens of the whole global batch, so the world size never changes the gradient.

Without a process group (a plain ``python -m sphinx_model.train``) no FSDP is applied; steps 1 and 2
still are.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Distributed",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "parallelize",
    "shutdown",
]


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, and whether a process group
    exists (``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> Distributed:
    """Joins the process group ``torchrun`` set up (``WORLD_SIZE`` in the environment), choosing NCCL
    on GPUs and Gloo on the CPU; without ``torchrun``, a single process. ``device``: ``auto`` (a GPU
    when there is one), ``cpu`` or ``cuda``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device = cuda but torch sees no GPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    if "WORLD_SIZE" not in os.environ:
        return Distributed(device=where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=where if use_cuda else None)
    return Distributed(dist.get_rank(), world_size, local_rank, where, True)


def shutdown(env: Distributed) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, env: Distributed, *, param_dtype: torch.dtype,
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Applies activation checkpointing, compile and FSDP2 to a ``SphinxX`` (or a bare ``LLM``) in the
    documented order, in place; returns the model. ``param_dtype``: the dtype parameters are gathered
    in for compute (float32 master weights stay sharded)."""
    llm = getattr(model, "llm", model)
    blocks = llm.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            # preserve_rng_state=False: the blocks use no randomness (no dropout), so the RNG state
            # need not be saved and restored around each recomputation.
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in blocks:
            block.compile(fullgraph=True)
    if not env.initialized:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=i < len(blocks) - 1)
    vision = getattr(model, "vision", None)
    if vision is not None:
        # One unit for both encoders: the tower calls their forward_features, not their forward,
        # so only the tower's own forward triggers FSDP's all-gather.
        fully_shard(vision, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Gloo has no pre-multiplied sum (NCCL's way of applying the factor): plain sums there.
            module.set_force_sum_reduction_for_comms(env.device.type != "cuda")
    return model


def all_reduce_sum(values: torch.Tensor, env: Distributed) -> torch.Tensor:
    """The sum over ranks of a float64 / int64 CPU or device tensor (returned; the input is kept)."""
    if not env.initialized:
        return values.clone()
    out = values.to(env.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def barrier(env: Distributed) -> None:
    if env.initialized:
        dist.barrier()


def broadcast_object(value, env: Distributed):
    """Rank 0's ``value`` on every rank (a small picklable object made by this program, e.g. a path:
    nothing read from a file)."""
    if not env.initialized:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
