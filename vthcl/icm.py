"""Instance Correspondence Maps (ICM): where in a clip is "the instance"?

For each level, the map before global pooling of one pathway, passed
through its φ with the fc layers as 1x1x1 convolutions (a unit embedding per
position), is multiplied pointwise with the *other* clip's final embedding:
the cosine per position, a heat map over [T, H, W].

    python -m vthcl.icm --checkpoint runs/pretrain/last.pt --video clip.mp4 --out icm/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from vthcl.model import VTHCL


@torch.no_grad()
def icm(model: VTHCL, slow: torch.Tensor, fast: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{level: {"slow": [B, T_s, H, W], "fast": [B, T_f, H, W]}}: each pathway's
    dense embedding against the other clip's pooled embedding (cosines)."""
    slow_maps, fast_maps = model.maps(slow, fast)
    z = model.embed(slow_maps, fast_maps)  # [L, 2, B, d]
    out = {}
    for k, lvl in enumerate(model.level_names):
        dense_s = model.heads[f"slow_{lvl}"].dense(slow_maps[lvl])   # [B, d, T, H, W]
        dense_f = model.heads[f"fast_{lvl}"].dense(fast_maps[lvl])
        out[lvl] = {"slow": torch.einsum("bdthw,bd->bthw", dense_s, z[k, 1]),
                    "fast": torch.einsum("bdthw,bd->bthw", dense_f, z[k, 0])}
    return out


def load_model(checkpoint: str, device: str = "cpu") -> tuple[VTHCL, dict]:
    ck = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg = ck["config"]
    model = VTHCL(cfg["arch"], cfg["width"], cfg["levels"], input=cfg.get("input", "rgb")).to(device)
    model.load_state_dict(ck["model"])
    return model.eval(), cfg


def clip_from_video(path: str, tau: int, alpha: int, slow_frames: int, crop_size: int):
    """The centre window of a video file, centre-cropped, normalised: (slow, fast, uint8 fast frames)."""
    import av
    from loaders.common import MEAN, STD, ClipSpec, crop_params
    from loaders.pyav import crop_clip
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    spec = ClipSpec(tau=tau, alpha=alpha, slow_frames=slow_frames)
    ids = spec.frame_ids(spec.starts(len(frames), train=False)[0], len(frames))
    picked = [frames[i] for i in ids]
    crop = crop_params(picked[0].height, picked[0].width, crop_size, train=False)
    raw = crop_clip(picked, crop, crop_size)                      # uint8 [3, T, S, S]
    x = (raw.float() - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)
    fast = x[None]
    return fast[:, :, ::alpha].contiguous(), fast, raw


def overlay_png(raw: torch.Tensor, heat: torch.Tensor, path: Path, title: str) -> None:
    """raw uint8 [3, T, S, S] frames; heat [T', h, w] -> a row of frames with the map over them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    T = raw.shape[1]
    size = raw.shape[-1]
    up = F.interpolate(heat[None, None].float(), size=(T, size, size), mode="trilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / max(hi - lo, 1e-6)
    show = list(range(0, T, max(1, T // 8)))[:8]
    fig, axes = plt.subplots(2, len(show), figsize=(2 * len(show), 4.3))
    axes = np.atleast_2d(axes)
    for j, t in enumerate(show):
        img = raw[:, t].permute(1, 2, 0).numpy()
        axes[0, j].imshow(img)
        axes[0, j].set_title(f"frame {t}", fontsize=8)
        axes[1, j].imshow(img)
        axes[1, j].imshow(up[t].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.suptitle(f"{title} (cosine {lo:.2f}..{hi:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_icm_pngs(model: VTHCL, cfg: dict, video: str, out: Path, name: str = "icm") -> list[Path]:
    slow, fast, raw = clip_from_video(video, cfg["tau"], cfg["alpha"], cfg["slow_frames"], cfg["crop_size"])
    maps = icm(model, slow, fast)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for lvl, m in maps.items():
        path = out / f"{name}_{lvl}.png"
        overlay_png(raw, m["fast"][0], path, f"ICM {lvl}: fast map x slow embedding — {Path(video).name}")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vthcl.icm", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="last.pt written by vthcl.train")
    p.add_argument("--video", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model, cfg = load_model(args.checkpoint)
    for path in write_icm_pngs(model, cfg, args.video, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
