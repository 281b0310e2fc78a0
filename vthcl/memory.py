"""Memory banks and the fused hierarchical contrastive loss of VTHCL.

Per hierarchy level k there is a slow bank and a fast bank of n x d unit
vectors (n = videos, d = 128), stored together as one tensor
``banks[level, pathway, n, d]`` (pathway 0 = slow, 1 = fast). With the
features ``q[level, pathway, B, d]`` of a batch whose videos are ``index``:

    h(x, y) = x . y / T                                (cosine: unit vectors)
    L_s^k   = CE([h(q_s, bank_f[i]), h(q_s, bank_f[neg])], 0)   slow query vs fast bank
    L_f^k   = CE([h(q_f, bank_s[i]), h(q_f, bank_s[neg])], 0)   fast query vs slow bank
    L       = sum_k  w_k (L_s^k + L_f^k)               (w_k = λ^k; default 1)

with N negatives ``neg`` drawn uniformly per step (shared by the batch, the
levels and both directions). After the step, ``bank[i] <- normalise(m *
bank[i] + (1 - m) * q)`` with m = 0.5 (lemniscate/CMC).

The hot path is fused: one gather of the negatives from all banks, one
batched matmul over levels x directions (forward and gradient computed in
the same pass, see :class:`_FusedNCE`), one scatter for the update — no
Python loop over levels. ``positive="batch"`` takes the positive from the
other pathway's current feature instead of its bank entry (an option; the
paper uses the bank).

Under DDP (``torch.distributed`` initialised) the update gathers every rank's
features and indices first, so all ranks hold identical banks.
:class:`ShardedMemoryBank` keeps only n/world_size rows per rank for
internet-scale n.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``x`` from every rank along ``dim`` (no gradient)."""
    if not _dist():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def all_gather_varlen(x: torch.Tensor, dim: int) -> torch.Tensor:
    """all_gather_cat for ranks whose sizes along ``dim`` differ (last partial batch)."""
    if not _dist():
        return x
    size = torch.tensor([x.shape[dim]], device=x.device)
    sizes = all_gather_cat(size).tolist()
    pad = max(sizes) - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    full = all_gather_cat(x, dim)
    chunks = full.split(max(sizes), dim=dim)
    return torch.cat([c.narrow(dim, 0, s) for c, s in zip(chunks, sizes)], dim=dim)


class _FusedNCE(torch.autograd.Function):
    """NCE-softmax loss of P query sets against their keys, forward and
    backward in one pass. q, pos: [P, B, d]; neg: [P, N, d]; returns [P] =
    mean_b (logsumexp_j [q.pos, q.neg_j] / T - q.pos / T).

    The keys carry no gradient (they are bank rows), so dL/dq is computed
    while the logits are hot — on a CPU in batch chunks that stay in cache
    (a GPU takes the whole batch at once) — and never stored: one batched
    matmul for the logits and one for the gradient, over all levels and
    directions together."""

    @staticmethod
    def forward(ctx, q, pos, neg, inv_t: float, chunk: int):
        P, B, _ = q.shape
        loss = q.new_zeros(P)
        grad = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        for s in range(0, B, chunk):
            qc, pc = q[:, s:s + chunk] * inv_t, pos[:, s:s + chunk]
            lp = (qc * pc).sum(-1)                                # [P, c] positive logits
            ln = torch.bmm(qc, neg.transpose(1, 2))               # [P, c, N] negative logits
            m = torch.maximum(ln.amax(-1), lp)
            en = ln.sub_(m.unsqueeze(-1)).exp_()                  # in place: exp(l - m)
            ep = (lp - m).exp()
            z = en.sum(-1) + ep
            loss += (z.log() + m - lp).sum(-1)
            if grad is not None:
                en.div_(z.unsqueeze(-1))                          # softmax over the negatives
                g = torch.bmm(en, neg).addcmul_((ep / z - 1).unsqueeze(-1), pc)
                grad[:, s:s + chunk] = g.mul_(inv_t / B)
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss / B

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.view(-1, 1, 1), None, None, None, None


class MemoryBank(torch.nn.Module):
    def __init__(self, num_videos: int, levels: int = 3, dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, level_weights=None, dtype=torch.float32,
                 positive: str = "bank", seed: int = 0):
        super().__init__()
        if num_videos < 2:
            raise ValueError(f"a memory bank needs at least 2 videos, got {num_videos}")
        if num_negatives > num_videos - 1:
            warnings.warn(f"num_negatives {num_negatives} > videos - 1 = {num_videos - 1}: using {num_videos - 1}",
                          stacklevel=2)
            num_negatives = num_videos - 1
        if not temperature > 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        if positive not in ("bank", "batch"):
            raise ValueError("positive must be 'bank' (paper) or 'batch'")
        self.num_videos, self.levels, self.dim = num_videos, levels, dim
        self.num_negatives, self.temperature, self.momentum = num_negatives, temperature, momentum
        self.positive = positive
        weights = [1.0] * levels if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != levels:
            raise ValueError(f"{len(weights)} level weights for {levels} levels")
        self.register_buffer("weights", torch.tensor(weights))
        self.seed, self.dtype = seed, dtype
        self.register_buffer("banks", self._init_rows(*self._rows(num_videos)))
        self.generator = torch.Generator().manual_seed(seed + 1)

    INIT_CHUNK = 1 << 16

    def _rows(self, num_videos: int) -> tuple[int, int]:
        """The bank rows this process holds: all of them."""
        return 0, num_videos

    def _init_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Random unit vectors for rows [lo, hi), the same whichever rows a bank
        holds: chunk c of INIT_CHUNK rows comes from a generator seeded by (seed, c),
        so a rank of a sharded bank makes only its own rows."""
        parts = []
        for c in range(lo // self.INIT_CHUNK, -(-hi // self.INIT_CHUNK)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            start = c * self.INIT_CHUNK
            rows = torch.randn(self.levels, 2, self.INIT_CHUNK, self.dim, generator=g)
            parts.append(rows[:, :, max(lo, start) - start:min(hi, start + self.INIT_CHUNK) - start])
        return F.normalize(torch.cat(parts, dim=2), dim=-1).to(self.dtype)

    def sample_negatives(self) -> torch.Tensor:
        return torch.randint(0, self.num_videos, (self.num_negatives,), generator=self.generator).to(
            self.banks.device)

    # ------------------------------------------------------------------ loss
    def loss(self, q: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor | None = None):
        """q: [levels, 2, B, d] unit features; index: [B]. Returns (total loss,
        per-level loss [levels] = L_s^k + L_f^k, unweighted)."""
        if negatives is None:
            negatives = self.sample_negatives()
        L, _, B, d = q.shape
        pos_keys, neg_keys = self.keys(index, negatives)         # [L, 2, B, d], [L, 2, N, d] (bank order)
        queries = q.flip(1)                                       # pair each pathway's query with the other bank
        if self.positive == "batch":
            pos_keys = q.detach()                                 # the other clip's current feature
        chunk = B if q.is_cuda else max(1, (32 << 20) // (4 * 2 * L * neg_keys.shape[2]))
        per = _FusedNCE.apply(queries.reshape(2 * L, B, d), pos_keys.reshape(2 * L, B, d).to(q.dtype),
                              neg_keys.reshape(2 * L, -1, d).to(q.dtype), 1.0 / self.temperature, chunk)
        per_level = per.view(L, 2).sum(1)
        return (self.weights.to(per_level) * per_level).sum(), per_level

    def keys(self, index: torch.Tensor, negatives: torch.Tensor):
        """Bank rows of the batch (positives) and the negatives, for every level and pathway."""
        return self.banks.index_select(2, index), self.banks.index_select(2, negatives)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, q: torch.Tensor, index: torch.Tensor) -> None:
        """bank[i] <- normalise(m bank[i] + (1 - m) q), for every rank's batch."""
        q = all_gather_varlen(q.detach(), dim=2)
        index = all_gather_varlen(index, dim=0)
        new = self.banks.index_select(2, index).float().mul_(self.momentum).add_(q.float(), alpha=1 - self.momentum)
        self.banks.index_copy_(2, index, F.normalize(new, dim=-1).to(self.banks.dtype))

    def forward(self, q: torch.Tensor, index: torch.Tensor):
        return self.loss(q, index)


class ShardedMemoryBank(MemoryBank):
    """Banks sharded across ranks: rank r owns rows [r*n/W, (r+1)*n/W).

    * negatives: each rank draws N/W rows of its own shard; their keys are
      all-gathered, so every rank scores its queries against all N;
    * positives: each rank looks up the rows it owns for the whole global
      batch; an all-reduce (sum) gives every rank every positive;
    * update: every rank sees the global batch (all-gather) and writes the
      rows it owns.

    Memory per rank is n/W x d per bank; traffic per step is N x d keys plus
    the global batch's features. With one process it equals MemoryBank.
    """

    def __init__(self, num_videos: int, *args, **kwargs):
        world = dist.get_world_size() if _dist() else 1
        rank = dist.get_rank() if _dist() else 0
        self.world, self.rank = world, rank
        self.lo = (num_videos * rank) // world
        self.hi = (num_videos * (rank + 1)) // world
        super().__init__(num_videos, *args, **kwargs)
        self.local_negatives = math.ceil(self.num_negatives / world)
        self.generator.manual_seed(self.generator.initial_seed() + 7919 * rank)

    def _rows(self, num_videos: int) -> tuple[int, int]:
        return self.lo, self.hi

    def sample_negatives(self) -> torch.Tensor:
        return torch.randint(self.lo, self.hi, (self.local_negatives,), generator=self.generator).to(
            self.banks.device)

    def _owned(self, rows: torch.Tensor):
        mine = (rows >= self.lo) & (rows < self.hi)
        return mine, (rows - self.lo).clamp(0, self.hi - self.lo - 1)

    def keys(self, index: torch.Tensor, negatives: torch.Tensor):
        """Positives by owner lookup + all-reduce; negatives drawn per shard, all-gathered."""
        B = index.shape[0]
        global_index = all_gather_varlen(index, 0)
        mine, local = self._owned(global_index)
        pos = self.banks.index_select(2, local).float() * mine.view(1, 1, -1, 1)
        if _dist():
            dist.all_reduce(pos)
            sizes = all_gather_cat(torch.tensor([B], device=index.device)).tolist()
            start = sum(sizes[: self.rank])
            pos = pos[:, :, start:start + B]
        neg = all_gather_cat(self.banks.index_select(2, negatives - self.lo).float(), dim=2)
        return pos, neg

    @torch.no_grad()
    def update(self, q: torch.Tensor, index: torch.Tensor) -> None:
        q = all_gather_varlen(q.detach(), dim=2)
        index = all_gather_varlen(index, dim=0)
        mine, local = self._owned(index)
        if mine.any():
            rows, qm = local[mine], q[:, :, mine]
            new = self.banks.index_select(2, rows).float().mul_(self.momentum).add_(qm.float(),
                                                                                     alpha=1 - self.momentum)
            self.banks.index_copy_(2, rows, F.normalize(new, dim=-1).to(self.banks.dtype))
