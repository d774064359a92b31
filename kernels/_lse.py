"""Online logsumexp + entropy accumulator, shared by the logits and the fused linear kernels.

For a row of (temperature-scaled) logits ``z`` visited one block at a time we keep, in float32,

    m = max z seen so far,   s = sum exp(z - m),   t = sum exp(z - m) * (z - m)

and rescale ``s`` and ``t`` whenever ``m`` grows (the "online softmax" of Milakov & Gimelshein).
At the end ``lse = m + log s`` and the entropy ``H = -sum p log p = lse - E_p[z] = log s - t / s``.
Keeping ``t`` relative to the running max (instead of accumulating ``sum exp(z - m) * z``) avoids
cancelling two numbers of the size of the logits when the entropy is small.
"""

from __future__ import annotations

import triton.language as tl

from fastppo.kernels._jit import jit


@jit
def online_lse_step(m, s, t, z, valid):
    """One block of the online update.

    z: [R, C] float32 block of logits, valid: [R, C] bool (columns past the vocabulary are False).
    m, s, t: [R] float32 running state (start: -inf, 0, 0). Returns the new (m, s, t).
    """
    z = tl.where(valid, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # A row with no valid column so far keeps m = -inf; exp(-inf - (-inf)) would be NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)  # rescales the old sums; exp(-inf) = 0 on the first block
    shift = tl.where(s > 0.0, m - m_ref, 0.0)  # old terms' (z - m_old) become (z - m_new)
    # Columns past the vocabulary and -inf logits (banned tokens, a -inf bias) contribute nothing;
    # keep d finite there so that e * d below is never 0 * inf = NaN.
    live = z > float("-inf")
    d = tl.where(live, z - m_ref[:, None], 0.0)
    e = tl.where(live, tl.exp(d), 0.0)
    s_new = s * alpha + tl.sum(e, axis=1)
    t_new = alpha * (t + s * shift) + tl.sum(e * d, axis=1)
    return m_new, s_new, t_new


@jit
def online_lse_finish(m, s, t):
    """``(m, log s, entropy)`` from the final state, with ``lse = m + log s``.

    The two parts are kept apart rather than summed into ``lse``: ``log p = (z - m) - log s`` is then
    exact to a few ulp of ``log p`` itself, whereas ``z - lse`` carries the rounding of ``lse``, one ulp
    of ``|lse|``; at a low temperature ``|lse|`` is in the hundreds, and that error, not cancelled by the
    exactly computed entropy, would dominate the entropy gradient. Rows with s == 0 (no finite column)
    give (0, 0, 0): log p = z there (-inf for the -inf columns), never NaN.
    """
    s_safe = tl.where(s > 0.0, s, 1.0)
    log_s = tl.log(s_safe)
    ent = log_s - t / s_safe
    return tl.where(s > 0.0, m, 0.0), log_s, tl.where(s > 0.0, ent, 0.0)
