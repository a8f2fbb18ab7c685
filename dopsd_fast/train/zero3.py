"""ZeRO-3 (partitioned parameters) for the D-OPSD trainer: what the DeepSpeed engine needs beyond ZeRO 0/1/2.

Under ZeRO-3 every parameter, frozen base and both LoRA adapters included, lives as a 1/world flat slice
(``param.ds_tensor``) and is all-gathered around each module's forward and backward by DeepSpeed's hooks. Full
fine-tuning's teacher, a second module, is partitioned the same way by an engine of its own without optimizer
(DeepSpeed's inference set-up, as DeepSpeed-Chat keeps its reference and EMA models): the same slicing, the same
hooks, so its forwards gather exactly as the student's do, per module or once per iteration.

* **Parameters read outside their module's forward** (norm weights handed to fused ops, LoRA adapters in
  ``ParameterDict``s, the caption pad token) are found by DeepSpeed's own discovery during a root forward;
  ``encode_context``, no forward, runs with discovery on too. (ZeRO-3 leaf modules would also gather them, but
  DeepSpeed reduces a leaf's gradients in its full backward hook, which fires before the parameter gradients
  exist when no input of the leaf requires grad, as in a frozen base's first block.)
* **EMA teacher on partitions** (:class:`PartitionedEMA`): each rank keeps the fp32 EMA master of its own teacher
  slices and moves it toward its slices of the student's fp32 master, the tensors DeepSpeed's optimizer steps
  (:func:`master_slices`); no communication; whole tensors are gathered only to write a checkpoint.
* **Gather once per iteration** (:func:`gathered_once`): one coalesced all-gather of every parameter (of both
  roles' modules) before the roll-out, kept through the K steps of both roles and every backward, released before
  the optimizer step (the idea of DeepSpeed-Chat's hybrid engine, which gathers the actor once per generation).
  The per-forward path gathers each module's parameters at every teacher forward, student forward and student
  backward.
* **Built without a whole copy per rank** (:func:`build_partitioned`): a pretrained transformer is built under
  ``deepspeed.zero.Init``, which cuts each module's parameters to this rank's slices as soon as the module exists,
  and each slice is then read from the safetensors files one tensor at a time; ``model.merge_loras`` folds each
  rank's slice of every LoRA update into its slices, and full fine-tuning's teacher is a second partitioned module
  that copies the student's slices (:func:`copy_partitioned`).
* :class:`AllGatherCounter` counts the all-gather collectives DeepSpeed issues (the ``all_gathers`` column).
"""
from __future__ import annotations

import ctypes
import itertools
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ..method.ema import EMATeacher

# Module ids no DeepSpeed module has (they count from 0): while one sits in a parameter's ds_active_sub_modules,
# DeepSpeed's release-after-use skips that parameter (partitioned_param_coordinator.__release_param). One per
# gathered_once, so nested ones (a sample grid around its samplings) do not unpin each other's.
_pins = itertools.count(1)


@contextmanager
def _discovering_parameters(model: nn.Module):
    """DeepSpeed gathers a parameter read outside its own module's forward (a norm weight handed to a fused op,
    a LoRA adapter in a ParameterDict, Z-Image's caption pad token) on first access and registers it with the
    running module, but only while the engine's forward prologue has flagged the root forward as running."""
    from deepspeed.runtime.zero.parameter_offload import ensure_zero_ordered_dict

    modules = list(model.modules())
    for m in modules:
        ensure_zero_ordered_dict(m)
        m._parameters._in_forward = True
    try:
        yield
    finally:
        for m in modules:
            m._parameters._in_forward = False


def discover_parameters_in(model: nn.Module, method: str) -> None:
    """Run ``model.<method>`` (a caption path that is no root forward) with DeepSpeed's parameter discovery on."""
    inner = getattr(model, method)

    def discovering(*args, **kwargs):
        with _discovering_parameters(model):
            return inner(*args, **kwargs)

    setattr(model, method, discovering)


@contextmanager
def gathered_once(*models: nn.Module):
    """All of ``models``' parameters gathered by one coalesced all-gather (one per dtype), kept whole until exit.

    Inside, DeepSpeed's fetch hooks find every parameter AVAILABLE and skip their all-gathers, and their
    release hooks see the pin and keep them. Gradients are unaffected: the per-parameter hooks that reduce-scatter
    a trainable parameter's gradient into its partition fire as in the per-forward path.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params, pin = list(dict.fromkeys(p for m in models for p in m.parameters())), -next(_pins)
    fetched = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if fetched:
        fetched[0].all_gather_coalesced(fetched).wait()
    for p in params:
        p.ds_active_sub_modules.add(pin)
    try:
        yield
    finally:
        for p in params:
            p.ds_active_sub_modules.discard(pin)
        release = [p for p in fetched if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if release:
            release[0].partition(param_list=release)


@contextmanager
def whole_weights(*models: nn.Module):
    """Every rank enters (a collective); inside, any one rank may run ``models`` alone, e.g. rank 0 sampling a grid.

    The parameters are gathered once, and DeepSpeed's module hooks are set aside: with a trace not yet complete,
    their start-of-forward step compares the module order across ranks, a collective the other ranks never join.
    """
    with gathered_once(*models):
        modules = dict.fromkeys(m for model in models for m in model.modules())
        saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in modules]
        for m, _, _ in saved:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        try:
            yield
        finally:
            for m, pre, post in saved:
                m._forward_pre_hooks, m._forward_hooks = pre, post


def gather_full(params: list[Tensor], parts: list[Tensor]) -> list[Tensor]:
    """Whole tensors of ZeRO-3 parameters from each rank's flat slice ``parts[i]`` (e.g. ``p.ds_tensor`` or an fp32
    master of it): one all-gather of all slices, on every rank (a collective)."""
    if not params:
        return []
    world = tdist.get_world_size(params[0].ds_process_group)
    flat = torch.cat([s.reshape(-1) for s in parts])
    out = flat.new_empty(world * flat.numel())
    tdist.all_gather_into_tensor(out, flat, group=params[0].ds_process_group)
    chunks, full, offset = out.view(world, -1), [], 0
    for p, s in zip(params, parts):
        n = s.numel()
        full.append(chunks[:, offset:offset + n].reshape(-1)[:p.ds_numel].view(p.ds_shape).clone())
        offset += n
    return full


def own_slice(param: Tensor, full: Tensor) -> Tensor:
    """This rank's flat slice of a whole tensor; the last rank's is zero-padded to the slice size (DeepSpeed never
    reads its padding back)."""
    n = param.ds_tensor.ds_numel
    start = tdist.get_rank(param.ds_process_group) * n
    flat = full.reshape(-1)[start:start + n]
    return torch.cat([flat, flat.new_zeros(n - flat.numel())]) if flat.numel() < n else flat


def build_partitioned(family, arch, folder: Path, dtype: torch.dtype, ds_config: dict) -> nn.Module:
    """``family``'s transformer of ``arch`` with each rank holding only its slices of the weights in ``folder`` (a
    diffusers transformer/ folder): peak host memory per rank is about model / world plus the largest tensor.

    The module is built under ``zero.Init`` (:func:`partitioned_module`); then each tensor of the files is read
    alone and this rank's slice copied into ``param.ds_tensor``. Small parameters DeepSpeed keeps whole
    ("persistent") are gathered from these slices by the engine later.
    """
    from ..models.loading import tensors_one_at_a_time

    model = partitioned_module(family, arch, dtype, ds_config)
    params, state = dict(model.named_parameters()), model.state_dict(keep_vars=True)
    wanted = {k: tuple(params[k].ds_shape) if k in params else tuple(v.shape) for k, v in state.items()}
    floating = [k for k, v in state.items() if v.is_floating_point()]
    with torch.no_grad():
        for key, whole in tensors_one_at_a_time(folder, wanted, floating, type(model).__name__, dtype):
            target = params.get(key)
            if target is None:          # a buffer: never partitioned
                state[key].copy_(whole)
            else:
                target.ds_tensor.copy_(own_slice(target, whole))
    return model


def partitioned_module(family, arch, dtype: torch.dtype, ds_config: dict) -> nn.Module:
    """``family``'s transformer of ``arch`` built under ``deepspeed.zero.Init``: every module's parameters are drawn
    and cut to this rank's slices as the module is built (values for the caller to overwrite)."""
    import deepspeed

    _unmap_large_frees()
    # the draws leave the global generator as the meta-device build of a whole load leaves it: the LoRA init after
    # this draws the same adapters
    with torch.random.fork_rng(devices=[]), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        return family.build(arch)


@torch.no_grad()
def copy_partitioned(model: nn.Module, build) -> nn.Module:
    """A copy of the partitioned ``model`` (full fine-tuning's teacher) built by ``build()`` (a
    :func:`partitioned_module` of the same architecture and config, so its slices line up with ``model``'s), each
    rank copying its own slices: no rank holds either whole."""
    twin = build()
    for src, dst in zip(model.parameters(), twin.parameters(), strict=True):
        dst.ds_tensor.copy_(src.ds_tensor)
    for src, dst in zip(model.buffers(), twin.buffers(), strict=True):
        dst.copy_(src)
    return twin


def _unmap_large_frees() -> None:
    """glibc raises its mmap threshold after the first large free (up to 32 MiB), and from then on every whole
    tensor zero.Init draws or the loader reads is a heap block that, freed between the slices kept, stays in the
    process. A fixed 1 MiB threshold (for the rest of the process) maps each such tensor on its own and unmaps it
    when freed: a 545 MB fp32 model on 2 CPU ranks, start-up peak +528 / +437 MB -> +370 / +370 MB (slices 279).
    It stays for the process because the engine's set-up after the build frees large blocks too: set back to the
    dynamic ceiling (32 MiB) once the slices are loaded, full fine-tuning's start-up peak in test_zero3_build went
    +524 / +524 -> +590 / +544 MB. Training's tensors over 1 MiB are then mapped per allocation: on the CPU only
    (CUDA memory has its own allocator) and only where a tensor passes 1 MiB (tiny-cpu's do not)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:         # no glibc: its allocator and this behaviour are not there
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


M_MMAP_THRESHOLD = -3       # glibc's malloc.h


def master_slices(optimizer, params: list[nn.Parameter]) -> list[Tensor]:
    """Views of this rank's slices of ``params`` in the fp32 master DeepSpeed's ZeRO-3 optimizer steps, each laid
    out (and padded) as the parameter's ``ds_tensor``. In fp32 they are the ``ds_tensor``s themselves; under bf16 the
    fp32 weights the bf16 slices are rounded from. DeepSpeed updates and loads them in place, so the views last."""
    out = []
    for p in params:
        group, at, n = optimizer.grad_position[optimizer.get_param_id(p)]
        out.append(optimizer.fp32_partitioned_groups_flat[group].narrow(0, at, n))
    return out


class PartitionedEMA(EMATeacher):
    """The EMA teacher over ZeRO-3 parameters, run on each rank's slices: the fp32 master of each teacher slice
    (the slice itself when the teacher is fp32) follows ``student``, the matching fp32 slices (``master_slices``).

    DeepSpeed keeps small "persistent" parameters (``stage3_param_persistence_threshold``) whole on every rank;
    after their slices change they are re-gathered (one all-gather), as DeepSpeed does after its optimizer step.
    """

    def __init__(self, names: list[str], teacher: list[nn.Parameter], student: list[Tensor]):
        super().__init__(dict(zip(names, [t.ds_tensor for t in teacher])), student)
        self.params = teacher

    @torch.no_grad()
    def update(self, decay: float) -> None:
        super().update(decay)
        self._refresh_whole()

    def _refresh_whole(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        whole = [t for t in self.params if t.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole)
            whole[0].all_gather_coalesced(whole).wait()

    def state_dict(self) -> dict[str, Tensor]:
        """Whole fp32 teacher tensors (a collective: every rank must call it)."""
        return dict(zip(self.names, gather_full(self.params, self.master)))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [k for k in self.names if k not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for p, t, m, k in zip(self.params, self.teacher, self.master, self.names):
            m.copy_(own_slice(p, state[k]))
            if t.data_ptr() != m.data_ptr():
                t.copy_(m)
        self._refresh_whole()


class AllGatherCounter:
    """Counts the all-gather collectives DeepSpeed issues in this process.

    Every ZeRO-3 parameter fetch ends in ``deepspeed.comm``'s ``all_gather_into_tensor`` (or ``all_gather`` on a
    torch without it), called through the ``deepspeed.comm`` module or from ``allgather_fn`` inside
    ``deepspeed.comm.comm``; both names are wrapped once per process.
    """

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> type["AllGatherCounter"]:
        if not cls._installed:
            import deepspeed.comm as ds_comm
            import deepspeed.comm.comm as ds_comm_impl

            for name in ("all_gather_into_tensor", "all_gather"):
                counted = cls._counting(getattr(ds_comm_impl, name))
                setattr(ds_comm_impl, name, counted)
                setattr(ds_comm, name, counted)
            cls._installed = True
        return cls

    @classmethod
    def _counting(cls, fn):
        def counted(*args, **kwargs):
            cls.count += 1
            return fn(*args, **kwargs)

        return counted

    @classmethod
    def take(cls) -> int:
        """All-gathers since the last call."""
        n, cls.count = cls.count, 0
        return n
