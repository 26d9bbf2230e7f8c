"""A rank's part of each trainable parameter: where it lives, and how to read and write it in place.

Rewinds keep and restore trainable states per rank, never gathered (docs/design.md §4). What
"this rank's part" is depends on how the training loop holds the model:

* plain parameters (one process, DDP, DeepSpeed ZeRO-1/2): the whole tensor. ZeRO-1/2 also keep
  an fp32 master copy of each rank's slice in the optimizer and copy it over the weights after
  every step, so a write sets it as well (``set_full_hp_param``), or the next step would undo it;
* FSDP2: the local shard of the ``DTensor``;
* DeepSpeed ZeRO-3: this rank's partition of the optimizer's flat fp32 master weights, read and
  written with DeepSpeed's safe accessors (``safe_get_local_fp32_param`` /
  ``safe_set_local_fp32_param``), and the partition the forward gathers (``ds_tensor``, in the
  training dtype), written from the same values as DeepSpeed's own step does. Parameters that
  ZeRO-3 keeps whole on every rank (small ones under ``stage3_param_persistence_threshold``)
  are gathered again afterwards, as DeepSpeed does after a step: a collective, so every rank
  writes together (rewinds always run on every rank).

A ZeRO-3 partition is a flat 1-D slice of the fp32 master (with padding on the last rank): its
shape says nothing of the parameter's, and a state kept under one world size does not load
under another (:func:`local_shapes` is what a kept state must match).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["is_zero3", "local_bytes", "local_shapes", "read_local", "trainable_parameters", "write_local"]

State = dict[str, torch.Tensor]


def is_zero3(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (it carries a ``ds_id``)."""
    return hasattr(p, "ds_id")


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2 may leave a module unsharded after a forward (the root by default): shard it back so
    its registered parameters are the ``DTensor`` shards again."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (the wrapper's ``module.`` prefix removed)."""
    base = getattr(model, "module", model)
    _reshard(base)
    return {n: p for n, p in base.named_parameters() if p.requires_grad}


def _dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a ``DTensor`` (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def check_writable(params: Mapping[str, torch.nn.Parameter]) -> None:
    """Raise ``ValueError`` where a parameter's part cannot be read and written in place."""
    for n, p in params.items():
        if is_zero3(p) and getattr(p, "_z3_optimizer", None) is None:
            raise ValueError(
                f"rewind: {n} is a DeepSpeed ZeRO-3 partition without a ZeRO optimizer (the master weights the "
                "rewind reads and writes); train it through a DeepSpeed engine with an optimizer, or use action 'stop'"
            )


def local_shapes(params: Mapping[str, torch.nn.Parameter]) -> dict[str, tuple[int, ...]]:
    """The shape of this rank's part of each parameter, as :func:`read_local` returns it."""
    return {n: (int(p.ds_tensor.numel()),) if is_zero3(p) else tuple(_dtensor_local(p).shape)
            for n, p in params.items()}


def local_bytes(params: Mapping[str, torch.nn.Parameter]) -> int:
    """Bytes of one copy of this rank's parts (ZeRO-3: the fp32 master partitions)."""
    total = 0
    for p in params.values():
        if is_zero3(p):
            total += int(p.ds_tensor.numel()) * 4
        else:
            local = _dtensor_local(p)
            total += local.numel() * local.element_size()
    return total


def read_local(p: torch.nn.Parameter) -> torch.Tensor:
    """A CPU copy of this rank's part of ``p`` (ZeRO-3: its fp32 master partition)."""
    with torch.no_grad():
        if is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).detach().to("cpu", copy=True)
        return _dtensor_local(p.detach()).to("cpu", copy=True)


def write_local(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state[name]`` (shaped as :func:`local_shapes`) into this rank's part of each parameter.

    Under ZeRO-3 every rank must call it together (whole-kept parameters are gathered again).
    """
    optimizers = {id(p._z3_optimizer): p._z3_optimizer for p in params.values() if is_zero3(p)}
    for opt in optimizers.values():  # as DeepSpeed's step does: every parameter back to its partition first
        opt.parameter_offload.partition_all_parameters()
    with torch.no_grad():
        for n, p in params.items():
            value = state[n]
            if is_zero3(p):
                from deepspeed.utils import safe_set_local_fp32_param

                master = value.to(device=p.ds_tensor.device, dtype=torch.float32)
                safe_set_local_fp32_param(p, master)
                p.ds_tensor.data.copy_(master.to(p.ds_tensor.dtype))
                continue
            local = _dtensor_local(p)
            local.copy_(value.to(device=local.device, dtype=local.dtype))
            set_master = getattr(p, "set_full_hp_param", None)  # ZeRO-1/2
            if callable(set_master):
                set_master(value.to(device=local.device))
    for opt in optimizers.values():
        # ... and after it: the parameters kept whole gathered again from the new partitions (a
        # collective), the hpZ secondary copies of the old values dropped.
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
        opt.invalidate_secondary_tensor()
