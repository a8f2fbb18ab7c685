"""Memory as the trainer plans it: activations autograd saves (live and peak), the resident set, the budget.

Device-independent (works on CPU, where there is no allocator high-water mark), so the per-step-backward
saving can be measured in tests and in bench/ alike. Parameters saved by ops (e.g. a Linear's weight) are
not activations and are not counted. ``model.checkpointing=auto`` sizes its plan from ``resident_bytes`` and the
blocks it measured (models/checkpointing.py) against ``train.memory_budget_gb``.

``memory_plan`` is the per-rank plan `dopsd train --dry-run` prints for the single-process trainer and ZeRO 0-3:
weights, gradients and optimizer state from the parameter counts, activations from a trace on the meta device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.roles import Roles
from ..models.checkpointing import CheckpointPlan, storage_key
from .config import Config, ConfigError, validate


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    """Bytes of the storages autograd's saved tensors keep alive (each storage once, however many ops save a view of
    it: the input of q, k and v is one tensor), now (``live``) and at most (``peak``)."""

    def __init__(self, *modules: nn.Module):
        self._param_storages = {storage_key(p) for m in modules for p in m.parameters()}
        self._refs: dict[int, list[int]] = {}      # storage -> [saved references alive, bytes]
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key in self._param_storages or t.device.type == "meta":
            return t
        refs = self._refs.setdefault(key, [0, t.untyped_storage().nbytes()])
        if refs[0] == 0:
            self.live += refs[1]
            self.peak = max(self.peak, self.live)
        refs[0] += 1
        box = _Saved(t)
        weakref.finalize(box, self._release, key)   # runs when autograd drops the saved tensor
        return box

    def _release(self, key: int) -> None:
        refs = self._refs[key]
        refs[0] -= 1
        if refs[0] == 0:
            self.live -= refs[1]
            del self._refs[key]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> "ActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def resident_bytes(roles: Roles, optimizer: torch.optim.Optimizer) -> int:
    """Bytes an iteration holds besides activations: both roles' weights, the trainable weights, the EMA master and
    the optimizer state (AdamW creates it in its first step: call this after one), plus the trainable weights'
    gradients, which live from the first backward to the optimizer step."""
    held = [*roles.student_model.parameters(), *roles.teacher_model.parameters(), *roles.trainable.values(),
            *roles.ema.master, *optimizer_tensors(optimizer)]
    return unique_bytes(held) + unique_bytes(roles.trainable.values())


def checkpoint_plan(cfg: Config, device: torch.device) -> CheckpointPlan:
    """``model.checkpointing`` as a plan; auto's budget is ``train.memory_budget_gb``, else the whole CUDA device."""
    mode, budget_gb = cfg.model.checkpointing, cfg.train.memory_budget_gb
    if mode != "auto":
        return CheckpointPlan(mode)
    if budget_gb is not None:
        return CheckpointPlan(mode, budget=int(budget_gb * 2**30))
    if device.type != "cuda":
        raise ConfigError(f"train.memory_budget_gb: model.checkpointing=auto on {device} needs a budget (only a CUDA "
                          "device's size is known), e.g. --set train.memory_budget_gb=16")
    return CheckpointPlan(mode, budget=torch.cuda.get_device_properties(device).total_memory)


def fit_checkpointing(plan: CheckpointPlan, roles: Roles, optimizer: torch.optim.Optimizer, cfg: Config,
                      rollout_steps: int) -> CheckpointPlan:
    """auto's plan for the rest of the run, after the first iteration (fully checkpointed, every block measured) and
    its optimizer step. Without per-step backward the K roll-out steps' student graphs are alive together."""
    graphs = 1 if cfg.method.per_step_backward or cfg.method.objective == "sft" else rollout_steps
    return plan.fit(resident_bytes(roles, optimizer), graphs)


# ---------------------------------------------------------------- the per-rank plan (`dopsd train --dry-run`)

# DeepSpeed 0.19's defaults for the zero_optimization keys the engine config leaves unset (deepspeed.extra may set
# them): ZeRO-2/3 reduce gradients through a bucket of this many elements; ZeRO-3 gathering module by module keeps
# at most this many parameter elements whole.
REDUCE_BUCKET = 500_000_000
MAX_LIVE = 1_000_000_000
STAGES = (None, 0, 1, 2, 3)         # None: the single-process trainer (one process, no DeepSpeed)


@dataclass
class RankMemory:
    """Bytes one rank holds in an iteration, by what holds them."""

    stage: int | None
    parameters: int     # what the forwards read: base + both adapters, or student + teacher copy (ZeRO-3: a slice)
    gradients: int      # of the trainable weights, first backward to the optimizer step (+ ZeRO-2/3's bucket)
    optimizer: int      # AdamW's two moments, plus the fp32 masters where they are a separate copy
    ema_master: int     # fp32 EMA master of the teacher, where the teacher is not fp32 itself
    gathered: int       # ZeRO-3: the other ranks' slices, whole during the roll-out (gather_once) or per module
    activations: int    # what autograd keeps for the student's backward at model.checkpointing
    note: str = ""

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.ema_master + self.gathered
                + self.activations)


def rank_memory(cfg: Config, total_params: int, trainable: int, activations: int, stage: int | None,
                world: int) -> RankMemory:
    """The plan of one ZeRO ``stage`` at ``world`` ranks, by this project's precision rules and DeepSpeed 0.19's
    layout (checked against the tensors ranks hold: tests/distributed/test_memory_plan.py).

    Trainable weights, their masters and AdamW state are fp32; the base (and the full teacher copy) is in
    model.dtype. DeepSpeed with bf16 casts every parameter, adapters included, to bf16, keeps gradients in bf16 and
    a separate fp32 master of the trainable weights (ZeRO 1-3 also in fp32: a flat copy of the rank's slice).
    """
    lora, w, n = cfg.adapter.mode == "lora", (2 if cfg.model.dtype == "bf16" else 4), world
    base, t = total_params, trainable
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    shard = (lambda b: b // n) if stage == 3 else (lambda b: b)      # ZeRO-3 partitions the parameters
    if stage is None:       # adapters stay fp32; a bf16 model trained in full gets fp32 masters (master_weights.py)
        masters = 0 if lora or w == 4 else 4 * t        # and the EMA one of the same size (method/ema.py)
        return RankMemory(None, base * w + (2 * t * 4 if lora else base * w), 4 * t, 8 * t + masters, masters, 0,
                          activations, "one process, no DeepSpeed")
    params = (base + 2 * t) * w if lora else 2 * base * w      # student + teacher adapters, or model + teacher copy
    if stage in (0, 1):
        grads = t * w
    else:
        grads = t * w // n + min(t, int(zero.get("reduce_bucket_size", REDUCE_BUCKET))) * w
    masters = 0 if stage == 0 and w == 4 else 4 * t     # ZeRO-0 in fp32 steps the parameters themselves
    optim = (masters + 8 * t) // (n if stage else 1)
    gathered, note = 0, ""
    if stage == 3:
        whole = params if cfg.deepspeed.gather_once else min(params, int(zero.get("stage3_max_live_parameters",
                                                                                   MAX_LIVE)) * w)
        gathered = whole - whole // n
        note = _refused_on(cfg, stage)
    return RankMemory(stage, shard(params), grads, optim, 0 if w == 4 else shard(4 * t), gathered, activations,
                      note)


def _refused_on(cfg: Config, stage: int) -> str:
    """Why this config cannot train on ZeRO-``stage`` yet (config.validate's refusal), or ""."""
    try:
        validate(dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, stage=stage)))
    except ConfigError as err:
        return f"planned, not yet supported: {str(err).split(':')[0]} (--set deepspeed.stage={stage} says why)"
    return ""


def student_activations(cfg: Config, arch) -> int:
    """Peak bytes autograd keeps for the student's backward in one iteration at ``model.checkpointing``, per rank
    (``train.batch_size`` images at ``data.image_size`` with ``context.max_text_tokens``-token captions, or the
    anchor's ``method.anchor_per_iteration`` captions if more: its roll-out runs after the batch's, so the larger
    of the two is what autograd holds), traced on the meta device: the model's own code, no weights, no arithmetic,
    seconds for a 6B model.

    Caption path plus one roll-out step's graph (per-step backward; K graphs without); checkpointed blocks keep
    their inputs, and the backward recomputes one block at a time (its saved bytes counted once, for selective as
    if every op were recomputed: an upper bound). Transient working memory inside an op is not counted.
    """
    from ..models.adapter import model_family
    from .build import DTYPES, build_model, build_roles

    dtype, family = DTYPES[cfg.model.dtype], model_family(arch)
    model = build_model(arch, "meta").to(dtype)
    roles = build_roles(cfg, model)
    params = {storage_key(p) for m in (roles.student_model, roles.teacher_model) for p in m.parameters()}
    b = max(cfg.train.batch_size, cfg.method.anchor_per_iteration)
    feats = [torch.empty(cfg.context.max_text_tokens, family.text_dim(arch), device="meta", dtype=dtype)] * b
    x = [torch.empty(family.latent_shape(cfg, arch), device="meta", dtype=dtype)] * b

    def trace(mode: str) -> tuple[int, int, CheckpointPlan]:
        """(caption path's bytes, one forward's bytes, the plan with every block measured) as autograd saves them
        outside the blocks' own checkpoints; auto's measuring pass runs every block checkpointed."""
        model.checkpointing = CheckpointPlan(mode, budget=0 if mode == "auto" else None)
        saved: dict[int, int] = {}

        def pack(t: Tensor):
            if storage_key(t) not in params:
                saved[storage_key(t)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ctx = roles.context("student", feats)
            caption = sum(saved.values())
            roles.student(x, torch.zeros(b, device="meta"), ctx)
        return caption, sum(saved.values()) - caption, model.checkpointing

    with _flash_attention():
        caption, forward, plan = trace("auto")       # every block checkpointed: inputs kept, saved bytes measured
        saved = [blk.saved for blk in plan.blocks.values()]
        graphs = 1 if cfg.method.per_step_backward else len(cfg.method.sigmas)
        mode = cfg.model.checkpointing
        if mode == "none":
            caption, forward = trace("none")[:2]
            return caption + graphs * forward
        if mode == "selective":
            caption, forward = _selective_trace(trace)
        elif mode == "auto" and cfg.train.memory_budget_gb is not None:     # no budget (CUDA): planned as full
            outside = forward - sum(blk.inputs for blk in plan.blocks.values())
            budget = int(cfg.train.memory_budget_gb * 2**30)
            return dataclasses.replace(plan, budget=budget).fit(0, graphs).need + caption + graphs * outside
    return caption + graphs * forward + max(saved, default=0)


@contextlib.contextmanager
def _flash_attention():
    """SDPA as a CUDA run computes it (FlashAttention / cuDNN: saves q, k, v, the output and the log-sum-exp). On
    the meta device SDPA takes its math path, which saves the (L, L) attention weights: 2.6 GiB per 6B block."""
    original = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                          scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _selective_trace(trace) -> tuple[int, int]:
    """``trace("selective")`` plus what selective checkpointing keeps inside each block (the outputs its policy
    saves), which torch holds in the checkpoint's own cache, out of reach of autograd's saved-tensor hooks."""
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from ..models import checkpointing
    from ..models.checkpointing import keep_policy

    kept: dict[int, int] = {}

    def recording(ctx, op, *args, **kwargs):
        policy = keep_policy(ctx, op, *args, **kwargs)
        if policy == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            kept.update((storage_key(t), t.untyped_storage().nbytes()) for t in tree_leaves(ctx.op_output)
                        if isinstance(t, Tensor))
        return policy

    original = checkpointing._selective_contexts       # run_block reads it at each call
    checkpointing._selective_contexts = functools.partial(create_selective_checkpoint_contexts, recording)
    try:
        caption, forward = trace("selective")[:2]
    finally:
        checkpointing._selective_contexts = original
    return caption, forward + sum(kept.values())


def memory_plan(cfg: Config, arch, total_params: int, trainable: int, world: int) -> list[RankMemory]:
    """One rank's plan for the single-process trainer and for ZeRO 0-3 at ``world`` ranks (`dopsd train --dry-run`)."""
    activations = student_activations(cfg, arch)
    return [rank_memory(cfg, total_params, trainable, activations, stage, world) for stage in STAGES]


def format_memory_plan(rows: list[RankMemory], cfg: Config, world: int) -> str:
    """The plan as a table of GiB (MiB for a model under 1 GiB) per rank; the configured stage is marked."""
    fields = ("parameters", "gradients", "optimizer", "ema_master", "gathered", "activations", "total")
    unit, scale = ("GiB", 2**30) if max(r.total for r in rows) >= 2**30 else ("MiB", 2**20)
    head = [f"per rank, {unit}".ljust(22)] + [f.replace("_", " ").rjust(11) for f in fields]
    lines = [f"memory plan: {world} rank(s), model.dtype={cfg.model.dtype}, adapter.mode={cfg.adapter.mode}, "
             f"model.checkpointing={cfg.model.checkpointing}, train.batch_size={cfg.train.batch_size} per rank "
             f"at {cfg.data.image_size}^2" + (f", {cfg.method.anchor_per_iteration} anchor captions per iteration"
                                               if cfg.method.anchor_per_iteration else ""), " ".join(head)]
    for r in rows:
        name = "no DeepSpeed" if r.stage is None else f"ZeRO-{r.stage}"
        mark = "*" if r.stage == cfg.deepspeed.stage else " "
        cells = [f"{getattr(r, f) / scale:11.2f}" for f in fields]
        lines.append(" ".join([f"{mark} {name}".ljust(22), *cells]) + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)
