"""The batch contract every backend keeps.

The contract (one dict per batch, whatever the backend):

- ``fast``: float [B, 3, alpha*slow_frames, H, W] — every (tau/alpha)-th frame
  of a window of slow_frames*tau source frames, from the window start;
- ``slow``: float [B, 3, slow_frames, H, W] — every tau-th frame, i.e.
  ``fast[:, :, ::alpha]`` (the same frames, the same crop);
- ``label``, ``index``: int64 [B] (index: the video's position in manifest order);
- ``frame_ids``: int64 [B, alpha*slow_frames] — the source frame numbers of
  ``fast``. A video shorter than the window is looped: frame ids wrap around
  modulo its frame count, starting at frame 0.

With ``normalize=True`` pixels are ``(x - 255*0.45) / (255*0.225)`` per channel
(the Kinetics statistics of PySlowFast); with ``normalize=False`` they are
floats in 0..255.

A member that cannot be decoded is reported (``loader.stats``: ``skipped``
and ``skip_reasons``, and a warning) and the epoch goes on. Evaluation
(``train=False``) yields every decodable video exactly once, with all its
views: the lost one is left out and the batch it fell in is smaller.
Training keeps batch sizes and step counts by substituting other clips
(``stats.substituted`` counts them). Under DDP every rank reads the same
number of samples: a rank's range may repeat its first video once (padding).
"""
from __future__ import annotations

# pixel normalisation of ``normalize=True``: PySlowFast's Kinetics statistics, in 0..255 units
MEAN = (0.45 * 255, 0.45 * 255, 0.45 * 255)
STD = (0.225 * 255, 0.225 * 255, 0.225 * 255)
