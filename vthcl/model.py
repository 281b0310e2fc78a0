"""Slow and fast encoders (SlowFast pathways without lateral connections) and the φ heads.

Choices, following SlowFast (Feichtenhofer et al. 2019) and the VTHCL paper:

* Slow pathway: stem conv 1x7x7 (stride 1,2,2) + max-pool 1x3x3; temporal
  kernel 1 in res2/res3 and 3 in res4/res5; no temporal down-sampling
  anywhere, so T stays the number of input frames.
* Fast pathway: channel ratio β = 1/8 of the slow widths; stem conv 5x7x7;
  temporal kernel 3 in every stage; no temporal down-sampling.
* No lateral connections: the two encoders g_s and g_f are independent
  networks; only the slow one is kept for downstream use.
* R50: bottleneck blocks [3, 4, 6, 3], the temporal kernel in the first 1x1
  conv of a block (as PySlowFast). R18: basic blocks [2, 2, 2, 2], the
  temporal kernel in the first 3x3 conv.
* ``width`` is the stem's channel count (64 in the paper); every stage
  scales with it, so width=8 gives a tiny model for CPU tests.
* The encoders return the res3, res4 and res5 maps (the hierarchy's levels).
* ``res5_dilation=2`` (detection, as PySlowFast's AVA models): res5 keeps
  res4's resolution (spatial stride 1) and dilates its spatial 3x3 convs by
  2, so its map has stride 16; the weights are the same tensors, so a
  pretrained encoder loads unchanged.
* φ is fc -> ReLU -> fc (``head="mlp"``, the paper's hierarchy) or one fc
  (``head="linear"``: the single 1x1x1 convolution of the paper's Instance
  Correspondence Map setting).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGE_BLOCKS = {"r18": [2, 2, 2, 2], "r50": [3, 4, 6, 3]}
LEVELS = ("res3", "res4", "res5")


def _bn(c: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, eps=1e-5, momentum=0.1)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """A block's projection shortcut (1x1x1 conv + BN) where its output differs in shape from its input."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv3d(cin, cout, 1, (1, stride, stride), bias=False), _bn(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, t: int, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.a = nn.Conv3d(cin, width, (t, 3, 3), (1, stride, stride), (t // 2, 1, 1), bias=False)
        self.a_bn = _bn(width)
        # (PySlowFast's BasicTransform dilates only the second 3x3 conv)
        self.b = nn.Conv3d(width, cout, (1, 3, 3), 1, (0, dilation, dilation), (1, dilation, dilation), bias=False)
        self.b_bn = _bn(cout)
        self.b_bn.final = True
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x):
        y = F.relu(self.a_bn(self.a(x)), inplace=True)
        y = self.b_bn(self.b(y))
        return F.relu(y + (x if self.short is None else self.short(x)), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, t: int, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.a = nn.Conv3d(cin, width, (t, 1, 1), 1, (t // 2, 0, 0), bias=False)
        self.a_bn = _bn(width)
        self.b = nn.Conv3d(width, width, (1, 3, 3), (1, stride, stride), (0, dilation, dilation),
                           (1, dilation, dilation), bias=False)
        self.b_bn = _bn(width)
        self.c = nn.Conv3d(width, cout, 1, bias=False)
        self.c_bn = _bn(cout)
        self.c_bn.final = True
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x):
        y = F.relu(self.a_bn(self.a(x)), inplace=True)
        y = F.relu(self.b_bn(self.b(y)), inplace=True)
        y = self.c_bn(self.c(y))
        return F.relu(y + (x if self.short is None else self.short(x)), inplace=True)


def temporal_residual(x: torch.Tensor) -> torch.Tensor:
    """Residual frames of a [B, C, T, H, W] clip: x[t] - x[t-1] (the first
    difference repeated at t=0), so a static background vanishes."""
    d = x[:, :, 1:] - x[:, :, :-1]
    return torch.cat([d[:, :, :1], d], dim=2) if x.shape[2] > 1 else torch.zeros_like(x)


class Pathway(nn.Module):
    """One SlowFast pathway as a 3D ResNet; forward returns {res3, res4, res5}.
    ``residual=True`` feeds it residual frames instead of RGB (an option; the
    paper uses RGB)."""

    def __init__(self, arch: str = "r18", width: int = 64, slow: bool = True, residual: bool = False,
                 res5_dilation: int = 1):
        super().__init__()
        if res5_dilation < 1:
            raise ValueError(f"res5_dilation must be at least 1, not {res5_dilation}")
        self.residual, self.res5_dilation = residual, res5_dilation
        if arch not in STAGE_BLOCKS:
            raise ValueError(f"unknown arch {arch!r}: choose r18 or r50")
        block = BasicBlock if arch == "r18" else Bottleneck
        self.arch, self.slow = arch, slow
        stem_t = 1 if slow else 5
        temporal = [1, 1, 3, 3] if slow else [3, 3, 3, 3]
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, (stem_t, 7, 7), (1, 2, 2), (stem_t // 2, 3, 3), bias=False), _bn(width),
            nn.ReLU(inplace=True), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        cin = width
        stages = []
        for i, (n, t) in enumerate(zip(STAGE_BLOCKS[arch], temporal)):
            w = width * 2 ** i
            dilation = res5_dilation if i == 3 else 1
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0 and dilation == 1) else 1
                blocks.append(block(cin, w, stride, t, dilation))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.res2, self.res3, self.res4, self.res5 = stages
        self.dims = {"res3": width * 2 * block.expansion, "res4": width * 4 * block.expansion,
                     "res5": width * 8 * block.expansion}
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 0.0 if getattr(m, "final", False) else 1.0)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.residual:
            x = temporal_residual(x)
        x = self.res2(self.stem(x))
        r3 = self.res3(x)
        r4 = self.res4(r3)
        r5 = self.res5(r4)
        return {"res3": r3, "res4": r4, "res5": r5}


HEADS = ("mlp", "linear")


class Head(nn.Module):
    """φ: fc -> ReLU -> fc to d (``kind="mlp"``) or one fc (``"linear"``),
    L2-normalised (on pooled features)."""

    def __init__(self, dim_in: int, dim_out: int = 128, hidden: int | None = None, kind: str = "mlp"):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {kind!r}")
        hidden = (hidden or dim_in) if kind == "mlp" else dim_in
        self.fc1 = nn.Linear(dim_in, hidden) if kind == "mlp" else None
        self.fc2 = nn.Linear(hidden, dim_out)

    def layers(self) -> list[nn.Linear]:
        return [fc for fc in (self.fc1, self.fc2) if fc is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1 is not None:
            x = F.relu(self.fc1(x))
        return F.normalize(self.fc2(x), dim=-1)

    def dense(self, fmap: torch.Tensor) -> torch.Tensor:
        """φ applied at every position of a [B, C, T, H, W] map, its fc layers as
        1x1x1 convolutions: [B, d, T, H, W], before the L2 normalisation (the
        ICM keeps the magnitudes)."""
        y = fmap
        for k, fc in enumerate(self.layers()):
            y = F.conv3d(F.relu(y) if k else y, fc.weight[:, :, None, None, None], fc.bias)
        return y


class VTHCL(nn.Module):
    """The two encoders and, per hierarchy level and pathway, a φ head.

    ``forward(slow, fast)`` returns the features as one tensor
    [levels, 2 (slow, fast), B, d] — the layout the fused loss consumes.
    """

    def __init__(self, arch: str = "r18", width: int = 64, levels: int = 3, dim: int = 128, beta: float = 1 / 8,
                 input: str = "rgb", head: str = "mlp"):
        super().__init__()
        if not 1 <= levels <= 3:
            raise ValueError("levels must be 1, 2 or 3 (res5; res4+res5; res3+res4+res5)")
        if input not in ("rgb", "residual"):
            raise ValueError("input must be 'rgb' (paper) or 'residual'")
        self.arch, self.width, self.levels, self.dim, self.input, self.head = arch, width, levels, dim, input, head
        self.level_names = LEVELS[3 - levels:]
        self.slow = Pathway(arch, width, slow=True, residual=input == "residual")
        self.fast = Pathway(arch, max(1, int(round(width * beta))), slow=False, residual=input == "residual")
        self.heads = nn.ModuleDict({
            f"{p}_{lvl}": Head(enc.dims[lvl], dim, kind=head)
            for p, enc in (("slow", self.slow), ("fast", self.fast)) for lvl in self.level_names})

    def maps(self, slow: torch.Tensor, fast: torch.Tensor):
        return self.slow(slow), self.fast(fast)

    def embed(self, slow_maps: dict, fast_maps: dict) -> torch.Tensor:
        feats = []
        for lvl in self.level_names:
            feats.append(torch.stack([
                self.heads[f"slow_{lvl}"](slow_maps[lvl].mean(dim=(2, 3, 4))),
                self.heads[f"fast_{lvl}"](fast_maps[lvl].mean(dim=(2, 3, 4)))]))
        return torch.stack(feats)

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return self.embed(*self.maps(slow, fast))


def slow_encoder_features(encoder: Pathway, clip: torch.Tensor, level: str = "res5") -> torch.Tensor:
    """Globally pooled features of the slow encoder (for probes and kNN)."""
    return encoder(clip)[level].mean(dim=(2, 3, 4))
