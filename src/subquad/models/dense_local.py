"""Dense attention with the ``local_rope`` position scheme: the dense twin of a ``local_rope`` SSA model.

Query ``p`` (block ``b = p // bs``) scores every earlier key ``j``:

* ``rotate(q, p) . rotate(k, j)`` when ``j`` lies in its local window, the ``local_blocks`` blocks
  ending with its own (``j >= ws(p) = max(0, b - local_blocks + 1) * bs``);
* ``q . k`` (no position) for every key before the window,

all in one causal softmax. It is SSA's ``local_rope`` scoring (``sparse_torch.py``) with every block
selected, so an SSA model at full budget and its dense twin compute the same function.

:func:`dense_local_rotary_attention` splits the keys of each query in three disjoint parts, merged by
their log-sum-exps:

* **prefix** and **diagonal**: the keys ``j <= p - local_blocks * bs``, unrotated. Shifted by
  ``local_blocks * bs`` this is ordinary causal attention, run by PyTorch's flash kernel as one
  non-causal call over the keys every query sees and one causal square (flash's causal mask is
  top-left aligned on the CPU), so no mask is ever materialised;
* **window**: the rest, at most ``(local_blocks + 1) * bs`` keys a query, gathered block by block in
  PyTorch: the unrotated tail of block ``b - local_blocks`` and the rotated window.

The backward gives each part the *merged* output and log-sum-exp (``p = exp(s - lse)`` is then the
global probability and ``delta = do . out`` the global row term), so each part's gradient is exact on
its own, as in ``sparse_triton.py``. :func:`dense_local_rotary_reference` is the plain reference.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from subquad.models.sparse_torch import Rotate
from subquad.ops.ssa.naive import chunk_elements


def _check(q, k, v, block_size, local_blocks) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v: expected 4-D [B, T, H, D] tensors, got {q.dim()}, {k.dim()}, {v.dim()} dims"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: inconsistent shapes")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads={q.shape[2]}: expected a multiple of the KV heads ({k.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q length={q.shape[1]}: expected at most the key length ({k.shape[1]})")
    for name, value in (("block_size", block_size), ("local_blocks", local_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")


def dense_local_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rotate: Rotate,
    block_size: int,
    local_blocks: int,
) -> torch.Tensor:
    """Reference: ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``, ``v [B, S, Hkv, Dv]`` unrotated, query ``i``
    at position ``S - T + i``. A chunk of queries scores all its keys both ways and keeps, per key, the
    score the window rule names (float32). Returns ``[B, T, Hq, Dv]`` in ``q.dtype``."""
    _check(q, k, v, block_size, local_blocks)
    batch, seq_len_q, heads_q, dim = q.shape
    seq_len_k = k.shape[1]
    chunk = max(1, chunk_elements(q.device) // max(1, 2 * batch * heads_q * seq_len_k))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = []
    for start in range(0, seq_len_q, chunk):
        stop = min(seq_len_q, start + chunk)
        args = (
            q[:, start:stop],
            k,
            v,
            seq_len_k - seq_len_q + start,
            scale,
            rotate,
            block_size,
            local_blocks,
        )
        out.append(
            checkpoint(_reference_chunk, *args, use_reentrant=False)
            if needs_grad
            else _reference_chunk(*args)
        )
    return torch.cat(out, dim=1)


def _reference_chunk(q, k, v, first_pos, scale, rotate, block_size, local_blocks):
    batch, chunk, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    keys = first_pos + chunk  # keys past the chunk's last query are masked anyway
    query_pos = torch.arange(first_pos, first_pos + chunk, device=q.device)
    key_pos = torch.arange(keys, device=q.device)
    qh = q.float().reshape(batch, chunk, heads_kv, group, dim).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tc, D]
    kh, vh = k[:, :keys].float().transpose(1, 2), v[:, :keys].float().transpose(1, 2)  # [B, Hkv, S, D]
    q_rot = rotate(qh, query_pos)
    k_rot = rotate(kh, key_pos)
    plain = torch.matmul(qh, kh[:, :, None].transpose(-1, -2))
    rotated = torch.matmul(q_rot, k_rot[:, :, None].transpose(-1, -2))
    window_start = ((query_pos // block_size - local_blocks + 1).clamp(min=0) * block_size)[:, None]
    scores = torch.where(key_pos >= window_start, rotated, plain) * scale
    scores = scores.masked_fill(key_pos > query_pos[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vh[:, :, None])  # [B, Hkv, G, Tc, Dv]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, chunk, heads_q, -1).to(q.dtype)


def dense_local_rotary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rotate: Rotate,
    block_size: int,
    local_blocks: int,
) -> torch.Tensor:
    """Same contract as :func:`dense_local_rotary_reference`, through PyTorch's flash kernel plus the
    gathered window. Differentiable in q, k, v. On CUDA flash takes float16/bfloat16 and head dims that
    are multiples of 8 up to 256; other CUDA inputs run the reference."""
    _check(q, k, v, block_size, local_blocks)
    if q.is_cuda and (q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 256):
        return dense_local_rotary_reference(q, k, v, scale, rotate, block_size, local_blocks)
    seq_len_q, seq_len_k = q.shape[1], k.shape[1]
    span = local_blocks * block_size
    # Rotated keys from the first query's window on: the queries' windows never reach further back.
    tail = max(0, ((seq_len_k - seq_len_q) // block_size - local_blocks + 1) * block_size)
    q_rot = rotate(q, torch.arange(seq_len_k - seq_len_q, seq_len_k, device=q.device)[None, :, None])
    k_rot = rotate(k[:, tail:], torch.arange(tail, seq_len_k, device=q.device)[None, :, None])
    return _DenseLocalRotary.apply(
        q, k, v, q_rot.to(q.dtype), k_rot.to(k.dtype), tail, span, block_size, scale
    )


class _DenseLocalRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_rot, k_rot, tail, span, block_size, scale):
        window = _Window(q.shape[1], k.shape[1], tail, span, block_size, q.device)
        parts = [_window_forward(q, k, v, q_rot, k_rot, window, scale)]
        flash = _FlashParts(q.shape[1], k.shape[1], span)
        parts += flash.forward(q, k, v, scale)
        out, lse = _merge(parts)
        ctx.save_for_backward(q, k, v, q_rot, k_rot, out, lse)
        ctx.meta = window, flash, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_rot, k_rot, out, lse = ctx.saved_tensors
        window, flash, scale = ctx.meta
        do = do.contiguous()
        delta = (do.float() * out).sum(-1)  # [B, T, Hq]
        dq, dk, dv, dq_rot, dk_rot = _window_backward(do, q, k, v, q_rot, k_rot, lse, delta, window, scale)
        flash.backward(do, q, k, v, out.to(q.dtype), lse, scale, dq, dk, dv)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dq_rot.to(q.dtype), dk_rot.to(k.dtype),
                None, None, None, None)  # fmt: skip


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts ``(out [B, T, H, Dv] float32 on its rows, lse [B, T, H] natural log, -inf where it saw no
    key)`` over disjoint keys -> one softmax's (out, lse), float32. Every row sees its own key in the
    window part, so the merged lse is finite."""
    top = torch.stack([lse for _, lse in parts]).amax(0)
    total = torch.zeros_like(top)
    out = torch.zeros_like(parts[0][0])
    for part_out, part_lse in parts:
        weight = torch.exp(part_lse - top)
        total += weight
        out += part_out * weight[..., None]
    return out / total[..., None], top + torch.log(total)


class _Window:
    """Where each query's window part lies: for query block ``b``, the keys of blocks ``b - L ..
    b`` (``L = local_blocks``), in a query layout padded to whole blocks. The first ``bs`` keys (block
    ``b - L``) are scored unrotated and only past ``p - L bs`` (earlier ones are the flash parts');
    the last ``L bs`` rotated, causally."""

    def __init__(self, seq_len_q, seq_len_k, tail, span, block_size, device):
        first = seq_len_k - seq_len_q
        self.block_size, self.tail = block_size, tail
        self.first_block = first // block_size
        self.blocks = (seq_len_k - 1) // block_size - self.first_block + 1
        self.front = first - self.first_block * block_size  # padded query rows before the first
        self.seq_len_q, self.seq_len_k = seq_len_q, seq_len_k
        blocks = torch.arange(self.first_block, self.first_block + self.blocks, device=device)
        offsets = torch.arange(span + block_size, device=device)
        self.key_pos = (blocks[:, None] - span // block_size) * block_size + offsets  # [nb, W]
        query_pos = blocks[:, None] * block_size + torch.arange(block_size, device=device)  # [nb, bs]
        kp, qp = self.key_pos[:, None, :], query_pos[:, :, None]
        plain = (offsets < block_size) & (kp > qp - span)
        rotated = (offsets >= block_size) & (kp <= qp)
        self.allowed = (plain | rotated) & (kp >= 0)  # [nb, bs, W]
        self.rows = (query_pos >= first) & (query_pos < seq_len_k)  # [nb, bs] real query rows

    def blocked(self, x: torch.Tensor) -> torch.Tensor:
        """Query rows ``[B, T, ...]`` -> ``[B, nb, bs, ...]`` (zero padding)."""
        pad = self.blocks * self.block_size - self.front - x.shape[1]
        x = torch.nn.functional.pad(x.movedim(1, -1), (self.front, pad)).movedim(-1, 1)
        return x.reshape(x.shape[0], self.blocks, self.block_size, *x.shape[2:])

    def unblocked(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`blocked`."""
        x = x.reshape(x.shape[0], self.blocks * self.block_size, *x.shape[3:])
        return x[:, self.front : self.front + self.seq_len_q]

    def gather(self, k: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Keys ``[B, S - start, H, D]`` (positions from ``start``) -> each block's window ``[B, nb, W,
        H, D]`` (positions outside read key ``start``: masked)."""
        index = (self.key_pos - start).clamp(0, k.shape[1] - 1).flatten()
        return k.index_select(1, index).view(k.shape[0], *self.key_pos.shape, *k.shape[2:])

    def scatter(self, grad: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
        """Inverse of :meth:`gather` for gradients: ``[B, nb, W, H, D]`` summed into ``[B, length, H, D]``."""
        index = (self.key_pos - start).clamp(0, length - 1).flatten()
        out = grad.new_zeros(grad.shape[0], length, *grad.shape[3:])
        return out.index_add_(1, index, grad.flatten(1, 2))


def _window_scores(q, k, q_rot, k_rot, window: _Window, scale):
    """Window-part scores ``[B, nb, bs, Hkv, G, W]`` (float32, -inf where masked) and the gathered keys."""
    heads_kv = k.shape[2]
    split = window.block_size
    qb = window.blocked(q.float()).unflatten(-2, (heads_kv, -1))  # [B, nb, bs, Hkv, G, D]
    qrb = window.blocked(q_rot.float()).unflatten(-2, (heads_kv, -1))
    kw = window.gather(k.float())[:, :, :split]  # [B, nb, bs, Hkv, D]
    krw = window.gather(k_rot.float(), window.tail)[:, :, split:]  # [B, nb, L bs, Hkv, D]
    scores = torch.cat(
        [torch.einsum("bnqhgd,bnwhd->bnqhgw", qb, kw), torch.einsum("bnqhgd,bnwhd->bnqhgw", qrb, krw)], dim=-1
    )
    scores = (scores * scale).masked_fill(~window.allowed[None, :, :, None, None, :], float("-inf"))
    return scores, qb, qrb, kw, krw


def _window_forward(q, k, v, q_rot, k_rot, window: _Window, scale):
    scores, *_ = _window_scores(q, k, q_rot, k_rot, window, scale)
    lse = torch.logsumexp(scores, dim=-1)  # finite on real rows: each sees its own key
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    vw = window.gather(v.float())  # [B, nb, W, Hkv, Dv]
    out = torch.einsum("bnqhgw,bnwhd->bnqhgd", probs, vw)
    return window.unblocked(out.flatten(3, 4)), window.unblocked(lse.flatten(3, 4))


def _window_backward(do, q, k, v, q_rot, k_rot, lse, delta, window: _Window, scale):
    """Gradients of the window part given the merged ``lse`` and ``delta``; float32. Returns
    ``dq, dk, dv, dq_rot, dk_rot`` (dq, dk, dv to be completed by the flash parts)."""
    heads_kv, split = k.shape[2], window.block_size
    scores, qb, qrb, kw, krw = _window_scores(q, k, q_rot, k_rot, window, scale)
    lse_b = window.blocked(lse).unflatten(-1, (heads_kv, -1))
    probs = torch.exp(scores - lse_b[..., None]).nan_to_num(0.0)  # global probabilities
    probs = probs * window.rows[None, :, :, None, None, None]  # padded rows contribute nothing
    dob = window.blocked(do.float()).unflatten(-2, (heads_kv, -1))  # [B, nb, bs, Hkv, G, Dv]
    vw = window.gather(v.float())
    dvw = torch.einsum("bnqhgw,bnqhgd->bnwhd", probs, dob)
    dp = torch.einsum("bnqhgd,bnwhd->bnqhgw", dob, vw)
    delta_b = window.blocked(delta).unflatten(-1, (heads_kv, -1))
    ds = probs * (dp - delta_b[..., None]) * scale
    ds_plain, ds_rot = ds[..., :split], ds[..., split:]
    dq = torch.einsum("bnqhgw,bnwhd->bnqhgd", ds_plain, kw)
    dq_rot = torch.einsum("bnqhgw,bnwhd->bnqhgd", ds_rot, krw)
    dkw = torch.einsum("bnqhgw,bnqhgd->bnwhd", ds_plain, qb)
    dkrw = torch.einsum("bnqhgw,bnqhgd->bnwhd", ds_rot, qrb)
    seq_len_k = window.seq_len_k
    pad = dkrw.new_zeros(*dkw.shape[:2], dkrw.shape[2], *dkw.shape[3:])
    dk = window.scatter(torch.cat([dkw, pad], dim=2), seq_len_k)
    pad = dkw.new_zeros(*dkrw.shape[:2], split, *dkrw.shape[3:])
    dk_rot = window.scatter(torch.cat([pad, dkrw], dim=2), seq_len_k - window.tail, window.tail)
    dv = window.scatter(dvw, seq_len_k)
    return (window.unblocked(dq.flatten(3, 4)), dk, dv, window.unblocked(dq_rot.flatten(3, 4)), dk_rot)


class _FlashParts:
    """The unrotated keys ``j <= p - span`` of each query, through PyTorch's flash kernel.

    Keys ``[0, S - span)`` (``S'``), queries from the first with such a key (``a``, ``T' = T - a``):
    query ``i`` of them sees ``j <= i + S' - T'``, i.e. all of the first ``S' - T'`` keys (the
    *prefix*, a non-causal call) and a causal square over the last ``T'`` (the *diagonal*)."""

    def __init__(self, seq_len_q, seq_len_k, span):
        keys = seq_len_k - span
        first_query = max(0, span - (seq_len_k - seq_len_q))
        self.rows = slice(first_query, seq_len_q)
        count = seq_len_q - first_query
        self.parts = []  # (key slice, causal)
        if keys > 0 and count > 0:
            if keys > count:
                self.parts.append((slice(0, keys - count), False))
            self.parts.append((slice(keys - count, keys), True))

    def forward(self, q, k, v, scale):
        """Each part's (out, lse) on all rows (-inf lse on rows it does not cover); keeps what the
        backward's flash calls need."""
        results, self.saved = [], []
        for keys, causal in self.parts:
            out, lse, saved = _flash_forward(q[:, self.rows], k[:, keys], v[:, keys], causal, scale)
            self.saved.append(saved)
            full_out = out.new_zeros(*q.shape[:3], v.shape[-1])
            full_lse = lse.new_full(q.shape[:3], float("-inf"))
            full_out[:, self.rows] = out
            full_lse[:, self.rows] = lse
            results.append((full_out, full_lse))
        return results

    def backward(self, do, q, k, v, out, lse, scale, dq, dk, dv):
        """Add each part's gradients into ``dq, dk, dv`` (float32)."""
        rows = self.rows
        for (keys, causal), saved in zip(self.parts, self.saved):
            gq, gk, gv = _flash_backward(
                do[:, rows],
                q[:, rows],
                k[:, keys],
                v[:, keys],
                out[:, rows],
                lse[:, rows],
                causal,
                scale,
                saved,
            )
            dq[:, rows] += gq
            dk[:, keys] += gk
            dv[:, keys] += gv


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H, D]`` -> ``[B, heads, N, D]``, KV heads repeated for the query heads (GQA)."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _flash_forward(q, k, v, causal, scale):
    """One flash call: ``q [B, T, Hq, D]`` against ``k, v [B, S, Hkv, D]`` (top-left causal when
    ``causal``, i.e. ``T == S`` here) -> (out ``[B, T, Hq, Dv]`` float32, lse ``[B, T, Hq]``, what the
    CUDA backward takes besides: the forward's sequence-length and RNG outputs, passed back as given)."""
    heads = q.shape[2]
    qt, kt, vt = q.transpose(1, 2), _heads_first(k, heads), _heads_first(v, heads)
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, scale=scale)
        )
        saved = (cum_q, cum_k, max_q, max_k, seed, offset)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=scale
        )
        saved = ()
    return out.transpose(1, 2).float(), lse[..., : q.shape[1]].transpose(1, 2), saved


def _flash_backward(do, q, k, v, out, lse, causal, scale, saved):
    """Gradients of one flash call given the merged ``out`` and ``lse``; dk, dv summed over the query
    heads of each KV head. float32."""
    heads, heads_kv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), _heads_first(k, heads), _heads_first(v, heads)
    dot, outt, lset = do.transpose(1, 2), out.transpose(1, 2), lse.transpose(1, 2).contiguous()
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, outt, lset, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
        )
    else:
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dot, qt, kt, vt, outt, lset, 0.0, causal, scale=scale
        )
    if heads != heads_kv:
        gk = gk.unflatten(1, (heads_kv, -1)).sum(2)
        gv = gv.unflatten(1, (heads_kv, -1)).sum(2)
    return gq.transpose(1, 2).float(), gk.transpose(1, 2).float(), gv.transpose(1, 2).float()
