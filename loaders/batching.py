"""Finishing a batch of the contract: uint8 clips -> float (normalised),
slow = fast[:, :, ::alpha], channels_last_3d, on the device; reused CPU buffers."""
from __future__ import annotations

from loaders.contract import MEAN, STD


class BatchBuffers:
    """CPU batch tensors handed out again once nothing outside holds them.

    A fresh batch (77 MB of float fast + slow clips at 8 x 224^2) is mmap-ed
    anew by malloc and every page faults on its first write: about a third of
    the time the main process spends making a CPU batch. A buffer is reused
    only when its storage has no holder but this pool — no batch, view,
    numpy array or autograd graph (which keeps a conv's input for backward)
    still refers to it; otherwise a new one is made. At most ``keep`` buffers
    of the current shape are kept (a consumer holds the last batch while the
    next is made: two suffice); a new shape drops the others. Without
    torch's storage use count (a private function) nothing is reused."""

    def __init__(self, keep: int = 2):
        import torch
        self.torch, self.keep = torch, keep
        self.bufs: dict[tuple, list] = {}
        self.use_count = getattr(torch._C, "_storage_Use_Count", None)

    def _free(self, buf) -> bool:
        # holders of the storage: ``buf`` itself and the temporary storage object of this call
        # (only pooled buffers are asked, and nothing is pooled without ``use_count``)
        return self.use_count(buf.untyped_storage()._cdata) == 2

    def empty(self, shape: tuple, memory_format):
        torch = self.torch
        key = (tuple(shape), memory_format)
        if key not in self.bufs:
            self.bufs = {key: []}
        bufs = self.bufs[key]
        buf = next((b for b in bufs if self._free(b)), None)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
            if len(bufs) < self.keep and self.use_count is not None:
                bufs.append(buf)
            else:
                return buf
        return buf[...]  # a view: the caller's reference counts as a holder


class Normalizer:
    """Finishes a batch of the contract on the device: uint8/float clips ->
    float (normalised or 0..255), slow = fast[:, :, ::alpha] unless given,
    optional channels_last_3d, every tensor on ``device``.

    ``fast``/``slow`` are batch tensors, or lists of per-clip tensors
    [C, T, H, W] (the PyAV backend's worker outputs): on a CPU device each
    clip is converted and normalised straight into the float batch, one clip
    at a time while it is in cache, with no uint8 batch in between, and the
    batches come from :class:`BatchBuffers`; on a GPU the list is stacked
    (into pinned memory with ``pin_memory``), sent as uint8 and converted
    there."""

    def __init__(self, alpha: int, normalize: bool, device, channels_last: bool = False, threads: int | None = None):
        import torch
        self.torch = torch
        self.alpha, self.normalize, self.channels_last = alpha, normalize, channels_last
        self.threads = threads  # intra-op threads while finishing a batch (None: the process's setting)
        self.device = torch.device(device)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1, 1)
        self.format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.buffers = {"fast": BatchBuffers(), "slow": BatchBuffers()}

    def _clips_on_cpu(self, x) -> bool:
        """Per-clip tensors for a CPU device: finished straight into a reused batch buffer."""
        return isinstance(x, (list, tuple)) and self.device.type == "cpu"

    def _prep(self, x, pin_memory: bool, name: str = "fast"):
        torch = self.torch
        if self._clips_on_cpu(x):
            out = self.buffers[name].empty((len(x), *x[0].shape), self.format)
            for o, clip in zip(out, x):
                o.copy_(clip)
                if self.normalize:
                    o.sub_(self.mean[0]).div_(self.std[0])
            return out
        if isinstance(x, (list, tuple)):
            x = torch.stack(x, out=torch.empty((len(x), *x[0].shape), dtype=x[0].dtype, pin_memory=pin_memory))
        x = x.to(self.device, non_blocking=True).float()
        if self.normalize:
            x = x.sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.format)

    def __call__(self, fast, slow, meta: dict, pin_memory: bool = False) -> dict:
        torch = self.torch
        if not self.threads:
            return self._finish(fast, slow, meta, pin_memory)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._finish(fast, slow, meta, pin_memory)
        finally:
            torch.set_num_threads(before)

    def _finish(self, fast, slow, meta: dict, pin_memory: bool) -> dict:
        from_clips = self._clips_on_cpu(fast)
        fast = self._prep(fast, pin_memory)
        if slow is not None:
            slow = self._prep(slow, pin_memory, "slow")
        else:
            slow = fast[:, :, :: self.alpha]
            if from_clips:  # into a reused buffer (the copy ``contiguous`` below would make is a fresh batch)
                slow = self.buffers["slow"].empty(slow.shape, self.format).copy_(slow)
        slow = slow.contiguous(memory_format=self.format)
        out = {"slow": slow, "fast": fast}
        out.update({k: v.to(self.device, non_blocking=True) for k, v in meta.items()})
        return out
