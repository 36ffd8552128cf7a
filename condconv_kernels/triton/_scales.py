"""The per-example scales (in_scale, out_scale, tap_scale) as the kernels read them: one helper
for the device and one for the launchers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def scale_factor(p_a, s_a, o_a, p_c, s_c, o_c, b, mask, HAS_A: tl.constexpr,
                 HAS_C: tl.constexpr, ACC: tl.constexpr):
    """a[b, o_a] * c[b, o_c] of the per-example scales a and c that are present (at least one:
    HAS_A or HAS_C; s_a, s_c their strides between examples, o_a, o_c element offsets), in the
    accumulation dtype, 1 in masked lanes."""
    bb = tl.cast(b, tl.int64)
    if HAS_A:
        f = tl.load(p_a + bb * s_a + o_a, mask=mask, other=1.0).to(ACC)
        if HAS_C:
            f = f * tl.load(p_c + bb * s_c + o_c, mask=mask, other=1.0).to(ACC)
    else:
        f = tl.load(p_c + bb * s_c + o_c, mask=mask, other=1.0).to(ACC)
    return f


def launch_args(scales: Sequence[Optional[torch.Tensor]], taps: int, stand_in: torch.Tensor
                ) -> Tuple[tuple, tuple, dict]:
    """The kernels' arguments for (in_scale (B, Cin), out_scale (B, Cout), tap_scale (B, kh,
    kw)), each possibly None: the three pointers (``stand_in``, never read, for an absent one),
    the six strides (between examples, then along the scale: tap_scale's taps flattened) and the
    IN_SCALE / OUT_SCALE / TAP_SCALE flags."""
    in_s, out_s, tap_s = scales
    if tap_s is not None:
        tap_s = tap_s.reshape(tap_s.shape[0], taps)
    present = (in_s, out_s, tap_s)
    pointers = tuple(stand_in if t is None else t for t in present)
    strides = tuple(s for t in present for s in ((0, 0) if t is None else t.stride()))
    flags = dict(IN_SCALE=in_s is not None, OUT_SCALE=out_s is not None,
                 TAP_SCALE=tap_s is not None)
    return pointers, strides, flags
