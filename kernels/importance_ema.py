"""Importance (sensitivity) math shared by the kernels that emit it: AdaLoRA's eq. 5-8 on a tile.

The same formulas on whole tensors: :mod:`adalora_fast.importance` (``sensitivity``, ``update_importance_ema``,
``element_score``); the oracle's own copy: :mod:`adalora_fast.reference.allocator`.
"""

import triton
import triton.language as tl


@triton.jit
def gradient_total(g_new, prev_ptrs, valid, ACCUMULATE: tl.constexpr):
    """The gradient ``.grad`` will hold after this backward, as autograd would form it.

    The new gradient is rounded to the parameter dtype first; with earlier
    micro-batches, ``prev + new`` is formed in fp32 and rounded, as torch's add does.
    """
    g = g_new.to(prev_ptrs.dtype.element_ty)
    if ACCUMULATE:
        g = (tl.load(prev_ptrs, mask=valid, other=0.0).to(tl.float32) + g.to(tl.float32)).to(prev_ptrs.dtype.element_ty)
    return g.to(tl.float32)


@triton.jit
def update_importance(w, g, ipt_ptrs, unc_ptrs, valid, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """I = |w·g|; Ī ← β1·Ī + (1−β1)·I; Ū ← β2·Ū + (1−β2)·|I − Ī| (updated Ī), stored in place.

    Returns the element score Ī·Ū of the stored values (0 outside ``valid``).
    """
    ipt = tl.abs(w.to(tl.float32) * g)
    avg = tl.load(ipt_ptrs, mask=valid, other=0.0).to(tl.float32)
    unc = tl.load(unc_ptrs, mask=valid, other=0.0).to(tl.float32)
    avg = (beta1 * avg + one_minus_beta1 * ipt).to(ipt_ptrs.dtype.element_ty)
    unc = (beta2 * unc + one_minus_beta2 * tl.abs(ipt - avg.to(tl.float32))).to(unc_ptrs.dtype.element_ty)
    tl.store(ipt_ptrs, avg, mask=valid)
    tl.store(unc_ptrs, unc, mask=valid)
    return tl.where(valid, avg.to(tl.float32) * unc.to(tl.float32), 0.0)
