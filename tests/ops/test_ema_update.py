"""ema_update: multi-tensor lerp launcher, custom op, functional and torch.compile against torch._foreach_lerp_."""
import pytest
import torch

from dopsd_fast._kernels import ema_update as _k
from dopsd_fast.ops._dispatch import use_backend
from dopsd_fast.ops.ema_update import ema_update
from dopsd_fast.ops.reference import ema_update_ref

SIZES = [(1,), (3,), (1000,), (4097,), (7, 123), (2, 3, 5)]
# Tolerance: none. Both sides compute one fused multiply-add per element from the same fp32 operands (torch.lerp's
# formula; the interpreter forms the product exactly in fp64), so the fp32 master is bit-identical; the
# low-precision copy is that master rounded to nearest even, i.e. equal to master.to(dtype).


def make(student_dtypes, lowp_dtype=None, seed=0, scale=1.0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    teacher = [torch.randn(sh, generator=g) for sh in SIZES]
    student = [(t + scale * torch.randn(sh, generator=g)).to(student_dtypes[i % len(student_dtypes)])
               for i, (t, sh) in enumerate(zip(teacher, SIZES))]
    lowp = None if lowp_dtype is None else [torch.full(sh, float("nan"), dtype=lowp_dtype) for sh in SIZES]
    return teacher, student, lowp


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0.0, atol=0.0)


STUDENTS = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "mixed": [torch.float32, torch.bfloat16, torch.float16]}


@pytest.mark.parametrize("decay", [0.9, 0.9999, 0.25])       # 0.25: lerp's large-weight branch
@pytest.mark.parametrize("students", list(STUDENTS))
@pytest.mark.parametrize("lowp_dtype", [None, torch.bfloat16, torch.float16])
def test_launcher_matches_foreach_lerp(device, decay, students, lowp_dtype):
    teacher, student, lowp = make(STUDENTS[students], lowp_dtype)
    want_t, want_l = clone(teacher), clone(lowp)
    _k.ema_update_(teacher, student, decay, lowp, block=1024)   # 4097 elements span 5 chunks
    ema_update_ref(want_t, student, decay, want_l)
    assert_same(teacher, want_t)
    if lowp is not None:
        assert_same(lowp, [t.to(lowp_dtype) for t in teacher])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_functional_repeated_updates(device, backend):
    """Ten steps at decay 0.9999 with a moving student: the fp32 master keeps every 1e-4 increment."""
    teacher, student, lowp = make(STUDENTS["mixed"], torch.bfloat16, seed=1, scale=1e-3)
    want_t, want_l = clone(teacher), clone(lowp)
    start = clone(teacher)
    with use_backend(backend):
        for step in range(10):
            ema_update(teacher, student, 0.9999, lowp)
            ema_update_ref(want_t, student, 0.9999, want_l)
    assert_same(teacher, want_t)
    assert_same(lowp, want_l)
    assert all(not torch.equal(t, s) for t, s in zip(teacher, start))


def test_views_into_flat_buffers(device):
    """Tensors as views at odd offsets of flat buffers (a flat fp32 master): misaligned, so no vector hints."""
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    sizes = [1, 3, 1000, 4097]
    offsets = torch.tensor([1, *sizes]).cumsum(0).tolist()           # element 1 first: 4-byte, not 16-byte aligned
    master, stu = torch.randn(offsets[-1], generator=g), torch.randn(offsets[-1], generator=g).bfloat16()
    low = torch.full((offsets[-1],), float("nan"), dtype=torch.bfloat16)
    views = [[b[o:o + n] for o, n in zip(offsets, sizes)] for b in (master, stu, low)]
    table, aligned = _k._chunk_table(views[0], views[1], views[2], 1024, master.device)
    assert not aligned and table.shape == (1 + 1 + 1 + 5, 4)
    want, first = clone(views[0]), master[0].clone()
    _k.ema_update_(views[0], views[1], 0.999, views[2], block=1024)
    ema_update_ref(want, views[1], 0.999)
    assert_same(views[0], want)
    assert_same(views[2], [w.bfloat16() for w in want])
    assert torch.isnan(low[0]) and master[0] == first                   # element 0 untouched
    assert _k._chunk_table(*make(STUDENTS["bf16"], torch.bfloat16), 1024, master.device)[1]   # fresh tensors: aligned


def test_table_cache_and_empty():
    teacher, student, _ = make(STUDENTS["fp32"])
    _k.ema_update_(teacher, student, 0.9)
    n = len(_k._TABLE_CACHE)
    _k.ema_update_(teacher, student, 0.9)            # same addresses: table reused
    assert len(_k._TABLE_CACHE) == n
    ema_update([], [], 0.9)
    _k.ema_update_([torch.empty(0)], [torch.empty(0)], 0.9)


def test_functional_partial_copy_list(device):
    """method/ema.py's case: fp32 teachers are their own master (entry None), the others get a copy."""
    teacher, student, lowp = make(STUDENTS["mixed"], torch.bfloat16, seed=5)
    entries = [lowp[0], None, None, *lowp[3:]]
    want_t, want_l = clone(teacher), clone(lowp)
    ema_update(teacher, student, 0.99, entries)
    ema_update_ref(want_t, student, 0.99)
    assert_same(teacher, want_t)
    assert_same([lowp[0], *lowp[3:]], [want_t[0].bfloat16(), *(w.bfloat16() for w in want_t[3:])])
    assert torch.isnan(lowp[1]).all() and torch.isnan(lowp[2]).all()


def test_rejects_bad_inputs():
    t = [torch.randn(3)]
    with pytest.raises(ValueError):
        ema_update(t, [torch.randn(4)], 0.9)
    with pytest.raises(ValueError):
        ema_update(t, [], 0.9)
    with pytest.raises(TypeError):
        ema_update([torch.randn(3).bfloat16()], [torch.randn(3)], 0.9)
    with pytest.raises(ValueError):                    # teacher_lowp aliasing the master
        ema_update(t, [torch.randn(3)], 0.9, [t[0].detach()])
    with pytest.raises(AssertionError):
        _k.ema_update_(t, [torch.randn(3)], 0.9, t)


def test_torch_compile_matches_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    teacher, student, lowp = make(STUDENTS["mixed"], torch.bfloat16, seed=2)
    want_t, want_l = clone(teacher), clone(lowp)

    @torch.compile(fullgraph=True)
    def step(teacher, student, lowp):
        ema_update(teacher, student, 0.99, lowp)

    step(teacher, student, lowp)
    ema_update(want_t, student, 0.99, want_l)
    assert_same(teacher, want_t)
    assert_same(lowp, want_l)


def test_opcheck():
    """Schema (mutated lists), fake kernel and AOT dispatch of the custom op."""
    teacher, student, lowp = make(STUDENTS["mixed"], torch.bfloat16, seed=4)
    torch.library.opcheck(torch.ops.dopsd.ema_update.default, (teacher, student, lowp, 0.9))
