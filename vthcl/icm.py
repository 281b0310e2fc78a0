"""Instance Correspondence Maps (ICM): where in a clip is "the instance"?

For each level, the map before global pooling of one pathway, passed
through its φ with the fc layers as 1x1x1 convolutions (an embedding per
position), is multiplied pointwise with the *other* clip's final (unit)
embedding: a heat map over [T, H, W]. As in the paper, the per-position
embeddings are not normalised: their magnitude is part of the answer (with
cosines every position counts alike, and the many background positions,
which make up most of the pooled embedding, look most like it).

Where the actor's position is known (the synthetic tempo videos) a map can
be scored: ``actor_auc`` is the probability that a pixel covered by the actor
is hotter than one that is not (0.5: no preference, 1: the actor is hotter
everywhere, 0: colder everywhere).

Tensors in, tensors out; reading videos, scoring on the synthetic set and
drawing PNGs are the CLI's (``python -m vthcl.icm_maps``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vthcl.model import VTHCL


@torch.no_grad()
def icm(model: VTHCL, slow: torch.Tensor, fast: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{level: {"slow": [B, T_s, H, W], "fast": [B, T_f, H, W]}}: each pathway's
    dense embedding against the other clip's pooled unit embedding."""
    slow_maps, fast_maps = model.maps(slow, fast)
    z = model.embed(slow_maps, fast_maps)  # [L, 2, B, d]
    out = {}
    for k, lvl in enumerate(model.level_names):
        dense_s = model.heads[f"slow_{lvl}"].dense(slow_maps[lvl])   # [B, d, T, H, W]
        dense_f = model.heads[f"fast_{lvl}"].dense(fast_maps[lvl])
        out[lvl] = {"slow": torch.einsum("bdthw,bd->bthw", dense_s, z[k, 1]),
                    "fast": torch.einsum("bdthw,bd->bthw", dense_f, z[k, 0])}
    return out


def actor_auc(heat: torch.Tensor, mask: torch.Tensor) -> float:
    """How much hotter the actor is than the rest: heat [T, h, w], mask [T', H, W]
    (the actor's pixels; T', H, W multiples of T, h, w). Every pixel takes the
    heat of the map cell it falls in; returns P(heat at an actor pixel > heat
    at another pixel), ties counting half (the Mann-Whitney AUC, computed per
    cell with the actor's coverage as weight); nan without actor or background."""
    cover = F.adaptive_avg_pool3d(mask[None, None].double(), heat.shape)[0, 0].flatten()
    h = heat.flatten().double()
    pos, neg = cover, 1 - cover
    if float(pos.sum()) == 0 or float(neg.sum()) == 0:
        return float("nan")
    diff = h[:, None] - h[None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return float(pos @ wins @ neg / (pos.sum() * neg.sum()))


def score_maps(model: VTHCL, clips, alpha: int) -> dict[str, dict[str, float]]:
    """Mean actor_auc per level and pathway over ``clips``, an iterable of
    (fast clip [1, 3, T, S, S] normalised, actor mask [T, S, S])."""
    scores: dict[str, dict[str, list]] = {}
    for fast, mask in clips:
        for lvl, pair in icm(model, fast[:, :, ::alpha].contiguous(), fast).items():
            for pathway, heat in pair.items():
                scores.setdefault(lvl, {}).setdefault(pathway, []).append(actor_auc(heat[0], mask))
    return {lvl: {pw: round(float(np.nanmean(v)), 4) for pw, v in per.items()} for lvl, per in scores.items()}
