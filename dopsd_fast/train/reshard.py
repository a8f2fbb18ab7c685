"""A DeepSpeed engine's trainable state as whole fp32 tensors keyed by parameter name, on any world size and ZeRO
stage: what lets a run resume on another number of ranks or another stage (``deepspeed_engine.py``).

The file format is the single-process trainer's (``checkpoint.optimizer_tensors``): ``optimizer.safetensors`` holds
``<name>::exp_avg``, ``<name>::exp_avg_sq`` and ``<name>::step`` per trainable parameter, each moment of its
parameter's shape; ``student.safetensors`` holds the fp32 master weights. A checkpoint of either trainer is thus
read by the other, on any world size.

Where DeepSpeed keeps each parameter's fp32 master and AdamW moments (``_Piece``), per rank:

* ZeRO 1/2 and the bf16 optimizer: one flat fp32 partition per param group; a parameter's fragment sits at
  ``_hp_mapping.hp_fragment_address`` in it and covers ``lp_fragment_address`` of the flattened parameter
  (DeepSpeed's ``tensor_fragment``; fragments of different ranks are disjoint).
* ZeRO-3: ``fp32_partitioned_groups_flat[group]`` at ``grad_position``; the rank's slice of the flattened
  parameter starts at ``rank * partition_numel`` (the last slice zero-padded).
* ZeRO-0 in fp32: the torch optimizer on the parameters themselves, whole on every rank.

Gathering sums each rank's fragments into zeros (a reduce, or all-reduce, per ``CHUNK`` elements per field) and
moves the result to the CPU; scattering copies each rank's fragments out of the whole tensors, no collective. The
AdamW state is created where DeepSpeed has not stepped yet (it is lazy). ZeRO-Offload (optimizer state on the CPU
or NVMe) is not covered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor, nn

FIELDS = ("exp_avg", "exp_avg_sq")          # AdamW's moments; "step" is one count per flat partition


@dataclass
class _Piece:
    flat: Tensor | None    # the fp32 tensor the inner optimizer steps (a flat partition, or the parameter itself)
    at: int                # where this rank's fragment starts in ``flat``
    start: int             # ... and in the flattened parameter
    numel: int             # its length (0: this rank holds none of the parameter)
    replicated: bool       # whole on every rank (ZeRO-0): nothing to sum


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that steps the fp32 tensors (DeepSpeed's ZeRO/bf16 optimizers wrap it as ``.optimizer``)."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def _piece(engine, p: nn.Parameter) -> _Piece:
    if hasattr(p, "ds_id"):                               # ZeRO-3
        opt = engine.optimizer
        group, at, n = opt.grad_position[opt.get_param_id(p)]
        start = tdist.get_rank(p.ds_process_group) * n
        return _Piece(opt.fp32_partitioned_groups_flat[group], at, start, max(0, min(n, p.ds_numel - start)), False)
    if hasattr(p, "_hp_mapping"):                         # ZeRO 1/2, bf16 optimizer
        m = p._hp_mapping
        if m is None:                                     # no fragment of it on this rank
            return _Piece(None, 0, 0, 0, False)
        flat = inner_optimizer(engine).param_groups[m.param_group_index]["params"][0]
        return _Piece(flat, m.hp_fragment_address.start, m.lp_fragment_address.start, m.lp_fragment_address.numel,
                      False)
    return _Piece(p, 0, 0, p.numel(), True)               # ZeRO-0, fp32: the parameter itself


def _numel(p: nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_id") else p.numel()


def whole_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape


def state_problem(shapes: dict[str, Tensor], optim: dict[str, Tensor]) -> str | None:
    """What keeps ``optim`` (optimizer.safetensors) from fitting parameters of ``shapes``, named; None when it fits.
    Empty is allowed (written before the first step); else every parameter needs each moment and its step."""
    if not optim:
        return None
    for key, t in optim.items():
        name, _, field = key.rpartition("::")
        if name not in shapes or field not in (*FIELDS, "step"):
            return f"{key!r} is no AdamW state of this run's trainable parameters"
        have, want = ((t.numel(),), (1,)) if field == "step" else (tuple(t.shape), tuple(shapes[name].shape))
        if have != want or not t.is_floating_point():
            return f"{key!r} is {t.dtype} of shape {tuple(t.shape)}, expected a float tensor of {want} elements"
    missing = [f"{n}::{f}" for n in shapes for f in (*FIELDS, "step") if f"{n}::{f}" not in optim]
    return f"{missing[0]!r} is missing ({len(missing)} tensors)" if missing else None


CHUNK = 1 << 26          # elements summed per collective (256 MiB of fp32): a full model is never whole on a GPU


def _gather(pieces: list[_Piece], params: list[nn.Parameter], read, to: int | None) -> list[Tensor]:
    """Whole fp32 tensors on the CPU: each rank's fragments (``read(piece)``: the flat tensor to cut them from) summed
    into zeros, ``CHUNK`` elements per collective, on every rank (``to`` None) or on rank ``to`` alone (others get
    an empty list). Every rank must call it unless every piece is replicated (ZeRO-0)."""
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    summed = tdist.is_initialized() and not all(piece.replicated for piece in pieces)
    device = next((piece.flat.device for piece in pieces if piece.flat is not None), torch.device("cpu"))
    out: list[Tensor] = []
    i = 0
    while i < len(params):                  # params[i:j]: at most CHUNK elements, or one larger parameter
        j, total = i + 1, _numel(params[i])
        while j < len(params) and total + _numel(params[j]) <= CHUNK:
            total, j = total + _numel(params[j]), j + 1
        sizes = [_numel(p) for p in params[i:j]]
        buf = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for piece, size in zip(pieces[i:j], sizes):
            if piece.numel:
                src = read(piece).reshape(-1)[piece.at:piece.at + piece.numel]
                buf[offset + piece.start:offset + piece.start + piece.numel] = src
            offset += size
        if summed and to is None:
            tdist.all_reduce(buf)
        elif summed:
            tdist.reduce(buf, dst=to)
        if to is None or rank == to:
            out += [t.view(whole_shape(p)).cpu() for t, p in zip(buf.split(sizes), params[i:j])]
        i = j
    return out


def gather_state(engine, params: dict[str, nn.Parameter], to: int | None = None
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(fp32 master weights by name, AdamW state as ``<name>::<field>``), whole, on every rank (``to`` None) or on
    rank ``to`` alone (two empty dicts elsewhere); every rank calls it (collectives). Before the first optimizer
    step the AdamW state is empty, as the single-process trainer's is."""
    names, plist = list(params), list(params.values())
    pieces = [_piece(engine, p) for p in plist]
    master = dict(zip(names, _gather(pieces, plist, lambda piece: piece.flat, to)))
    state = inner_optimizer(engine).state
    if not state:
        return master, {}
    optim: dict[str, Tensor] = {}
    for field in FIELDS:
        whole = _gather(pieces, plist, lambda piece: state[piece.flat][field], to)
        optim.update({f"{n}::{field}": t for n, t in zip(names, whole)})
    steps = [state[piece.flat]["step"] for piece in pieces if piece.flat in state]
    step = torch.tensor(float(max(steps)) if steps else 0.0)
    step = _max_over_ranks(step)            # a rank holding no fragment of any parameter has no count
    if master:
        optim.update({f"{n}::step": step.clone() for n in names})
    return master, optim


def _max_over_ranks(t: Tensor) -> Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


@torch.no_grad()
def scatter_state(engine, params: dict[str, nn.Parameter], master: dict[str, Tensor],
                  optim: dict[str, Tensor]) -> None:
    """Write whole tensors (``gather_state``'s, or the single-process trainer's files) into this rank's fragments:
    the fp32 masters, the model's own (low-precision, ZeRO-3: partitioned) parameters and AdamW's moments and step.
    No collective. ``optim`` empty (a checkpoint written before the first step) leaves AdamW's state empty."""
    inner = inner_optimizer(engine)
    if optim:
        step = next(iter(t for k, t in optim.items() if k.endswith("::step"))).to(torch.float32).reshape(())
        for flat in _flats(engine):
            if "step" not in inner.state.get(flat, {}):
                inner.state[flat] = {"step": step.clone(), **{f: torch.zeros_like(flat) for f in FIELDS}}
    for name, p in params.items():
        piece, value = _piece(engine, p), master[name].reshape(-1)
        if hasattr(p, "ds_id"):
            n = p.ds_tensor.ds_numel
            own = value[piece.start:piece.start + n]
            p.ds_tensor.reshape(-1)[:own.numel()].copy_(own)
            if p.data.numel() == p.ds_numel:        # a persistent (whole) parameter: its gathered copy too
                p.data.copy_(value.view(p.data.shape))
        else:
            p.data.copy_(value.view(p.shape))
        if piece.numel and piece.flat is not p:
            piece.flat.data[piece.at:piece.at + piece.numel].copy_(value[piece.start:piece.start + piece.numel])
        if not optim or not piece.numel:
            continue
        state = inner.state[piece.flat]
        state["step"].copy_(optim[f"{name}::step"].reshape(()))
        for field in FIELDS:
            whole = optim[f"{name}::{field}"].reshape(-1)[piece.start:piece.start + piece.numel]
            state[field].reshape(-1)[piece.at:piece.at + piece.numel].copy_(whole)


def _flats(engine) -> list[Tensor]:
    """Every fp32 tensor the inner optimizer steps on this rank (ZeRO-3 fills its param groups only per step)."""
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [p for g in inner_optimizer(engine).param_groups for p in g["params"]]
