"""Draw and score Instance Correspondence Maps of a pretrained checkpoint.

    python -m vthcl.icm_maps --checkpoint runs/pretrain/last.pt --video clip.mp4 --out icm/ [--score 4]

``--video``: one PNG per level of the video's centre clip (the frames, the
fast map against the slow clip's embedding, the slow map against the fast
one's). ``--score K``: ``actor_auc`` (see :mod:`vthcl.icm`) per level and
pathway on K synthetic tempo videos per class, whose actor masks are known,
for the checkpoint and for a random initialisation, in ``OUT/icm_score.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from vthcl import checkpoint as ckpt
from vthcl import options
from vthcl.icm import icm, score_maps
from vthcl.model import VTHCL

CLI = options.command("vthcl.icm_maps", __doc__, ["checkpoint", options.ICM, "out", "seed", "trust_checkpoint"],
                      recipe={"out": "runs/icm"}, required=("checkpoint",))


def score_checkpoint(model: VTHCL, cfg: dict, per_class: int, seed: int = 0, classes: int = 8) -> dict:
    """actor_auc per level and pathway on synthetic clips, for ``model`` and for
    a random initialisation of the same architecture (seed ``seed``)."""
    torch.manual_seed(seed)
    random = VTHCL(cfg["arch"], cfg["width"], cfg["levels"], input=cfg.get("input", "rgb"),
                   head=cfg.get("head", "mlp")).eval()
    clips = list(synthetic_clips(per_class, classes, cfg))
    return {"actor_auc": {"pretrained": score_maps(model, clips, cfg["alpha"]),
                          "random": score_maps(random, clips, cfg["alpha"])},
            "clips": len(clips)}


def synthetic_clips(per_class: int, classes: int, cfg: dict, seed: int = 10_000):
    """Evaluation clips of the synthetic tempo videos (shard_tools.make_synthetic),
    rendered with their actor masks: the centre window, sampled and cropped as
    at evaluation (loaders.sampling.crop_params), normalised by the loaders'
    Normalizer. Seeds from ``seed`` on, apart from the ones make_synthetic uses
    for its sets."""
    import torch.nn.functional as F

    from loaders.batching import Normalizer
    from loaders.sampling import ClipSpec, crop_params
    from shard_tools.make_synthetic import class_names, render
    spec = ClipSpec(tau=cfg["tau"], alpha=cfg["alpha"], slow_frames=cfg["slow_frames"])
    size = cfg["crop_size"]
    finish = Normalizer(cfg["alpha"], True, "cpu")
    for c, name in enumerate(class_names(classes)):
        for k in range(per_class):
            frames, mask = render(name, seed + c * per_class + k, num_frames=max(96, spec.window), with_mask=True)
            ids = spec.frame_ids(spec.starts(len(frames), train=False)[0], len(frames))
            crop = crop_params(frames.shape[1], frames.shape[2], size, train=False)
            x = torch.from_numpy(frames[ids]).permute(3, 0, 1, 2).float()          # [3, T, H, W]
            m = torch.from_numpy(mask[ids]).float()[None]
            x, m = (F.interpolate(v, size=(crop.height, crop.width), mode="bilinear", align_corners=False)
                    [:, :, crop.y0:crop.y0 + size, crop.x0:crop.x0 + size] for v in (x, m))
            yield finish(x[None], None, {})["fast"], m[0]


def load_model(checkpoint: str, device: str = "cpu", trust: bool = False) -> tuple[VTHCL, dict]:
    """The model of a vthcl.train last.pt, loaded as tensors and plain values
    only (see vthcl.checkpoint; ``trust``: unpickle in full)."""
    ck = ckpt.load(checkpoint, device, trust=trust)
    cfg = ck["config"]
    model = VTHCL(cfg["arch"], cfg["width"], cfg["levels"], input=cfg.get("input", "rgb"),
                  head=cfg.get("head", "mlp")).to(device)
    model.load_state_dict(ck["model"])
    return model.eval(), cfg


def clip_from_video(path: str, tau: int, alpha: int, slow_frames: int, crop_size: int):
    """The centre window of a video file, centre-cropped, normalised: (slow, fast, uint8 fast frames)."""
    import av

    from loaders.batching import Normalizer
    from loaders.pyav import crop_clip
    from loaders.sampling import ClipSpec, crop_params
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    spec = ClipSpec(tau=tau, alpha=alpha, slow_frames=slow_frames)
    ids = spec.frame_ids(spec.starts(len(frames), train=False)[0], len(frames))
    picked = [frames[i] for i in ids]
    crop = crop_params(picked[0].height, picked[0].width, crop_size, train=False)
    raw = crop_clip(picked, crop, crop_size)                      # uint8 [3, T, S, S]
    clip = Normalizer(alpha, True, "cpu")(raw[None], None, {})
    return clip["slow"], clip["fast"], raw


def overlay_png(raw: torch.Tensor, heats: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """raw uint8 [3, T, S, S] frames; heats {row label: [T', h, w]} -> the frames,
    then one row per map over them (each map scaled to its own min..max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    T = raw.shape[1]
    size = raw.shape[-1]
    show = list(range(0, T, max(1, T // 8)))[:8]
    fig, axes = plt.subplots(1 + len(heats), len(show), figsize=(2 * len(show), 2.1 * (1 + len(heats)) + 0.3))
    axes = np.atleast_2d(axes)
    for j, t in enumerate(show):
        axes[0, j].imshow(raw[:, t].permute(1, 2, 0).numpy())
        axes[0, j].set_title(f"frame {t}", fontsize=8)
    for i, (label, heat) in enumerate(heats.items(), start=1):
        up = F.interpolate(heat[None, None].float(), size=(T, size, size), mode="trilinear",
                           align_corners=False)[0, 0]
        lo, hi = float(up.min()), float(up.max())
        up = (up - lo) / max(hi - lo, 1e-6)
        for j, t in enumerate(show):
            axes[i, j].imshow(raw[:, t].permute(1, 2, 0).numpy())
            axes[i, j].imshow(up[t].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[i, 0].set_title(f"{label} ({lo:.2f}..{hi:.2f})", fontsize=8, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_icm_pngs(model: VTHCL, cfg: dict, video: str, out: Path, name: str = "icm") -> list[Path]:
    """One PNG per level for the centre clip of ``video``: the frames, the fast
    map against the slow clip's embedding, the slow map against the fast one's."""
    slow, fast, raw = clip_from_video(video, cfg["tau"], cfg["alpha"], cfg["slow_frames"], cfg["crop_size"])
    maps = icm(model, slow, fast)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for lvl, m in maps.items():
        path = out / f"{name}_{lvl}.png"
        overlay_png(raw, {"fast map x slow embedding": m["fast"][0], "slow map x fast embedding": m["slow"][0]},
                    path, f"ICM {lvl} — {Path(video).name} (red: hot)")
        paths.append(path)
    return paths


def run(cfg: options.Config | None = None, /, **values) -> dict:
    """Draw (``cfg.video``) and score (``cfg.score``) the maps of
    ``cfg.checkpoint`` into ``cfg.out``: ``{"pngs": [...], "score": {...}}``."""
    cfg = options.take("vthcl.icm_maps", cfg, values)
    if not cfg.video and not cfg.score:
        raise options.UsageError("give --video, --score or both")
    model, mcfg = load_model(cfg.checkpoint, trust=cfg.trust_checkpoint)
    out = Path(cfg.out)
    done: dict = {"pngs": [], "score": None}
    if cfg.video:
        done["pngs"] = write_icm_pngs(model, mcfg, cfg.video, out)
    if cfg.score:
        result = score_checkpoint(model, mcfg, cfg.score, cfg.seed)
        result["checkpoint"] = cfg.checkpoint
        out.mkdir(parents=True, exist_ok=True)
        (out / "icm_score.json").write_text(json.dumps(result, indent=1))
        done["score"] = result
    return done


def _job(cfg: options.Config) -> None:
    done = run(cfg)
    for path in done["pngs"]:
        print(path)
    if done["score"] is not None:
        print(json.dumps(done["score"], indent=1))


def main(argv=None) -> int:
    return options.cli("vthcl.icm_maps", _job, argv)


if __name__ == "__main__":
    sys.exit(main())
