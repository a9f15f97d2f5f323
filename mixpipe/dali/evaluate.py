"""Validation batches from DALI for :func:`mixpipe.train.evaluate`: resize, centre crop, in order.

Photos come in many sizes, so whole images cannot share a batch; ImageNet validation resizes
each so the crop covers ``ratio`` of its shorter side (256 -> 224: ``ratio = 224 / 256``) and
cuts the centre out. The batches are uint8 NCHW torch tensors, exactly what
:class:`mixpipe.train.EvalBatches` yields, so the trainer's own
:class:`~mixpipe.train.Normalize` prepares them the same way whichever loader produced them.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from ..core.augment import size_pair as _pair

__all__ = ["ValBatches", "center_crop_graph"]


def center_crop_graph(images, size: Union[int, Tuple[int, int]], ratio: float):
    """DALI graph: HWC images -> resized so that ``size / ratio`` fits inside (aspect kept,
    antialiased linear), then the centre ``size`` cut out. Returns HWC uint8."""
    from nvidia.dali import fn, types

    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    height, width = _pair(size)
    images = fn.resize(images, size=[height / ratio, width / ratio], mode="not_smaller",
                       antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.crop(images, crop=[float(height), float(width)], crop_pos_x=0.5, crop_pos_y=0.5,
                   out_of_bounds_policy="pad")


class ValBatches:
    """``(uint8 [B, 3, H, W], int64 [B])`` batches of every sample once, in file-list order.

    Args:
        file_root, file_list: as ``fn.readers.file`` takes them (``file_list`` lines are
            ``relative/path label``). :meth:`for_split` builds them for a prepared directory.
        size: output S or (height, width), normally the training size.
        ratio: the crop's share of the resized image (ImageNet: 224 / 256).
        device_id: None for CPU-only DALI, else the GPU (decoding on it: ``device="mixed"``);
            batches are then CUDA tensors.
    """

    def __init__(self, file_root: str, file_list: str, size: Union[int, Tuple[int, int]],
                 batch_size: int = 256, ratio: float = 224 / 256,
                 device_id: Optional[int] = None, num_threads: int = 2) -> None:
        from ..data.writers import read_file_list

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not os.path.isfile(file_list):
            raise FileNotFoundError(f"file list {file_list} does not exist; write one line "
                                    "'relative/path label' per image, or run `mixpipe data "
                                    "prepare`")
        self.file_root, self.file_list = os.path.abspath(file_root), os.path.abspath(file_list)
        self.size = _pair(size)
        self.ratio = float(ratio)
        self.batch_size = int(batch_size)
        self.device_id = device_id
        self.num_threads = int(num_threads)
        self.num_samples = len(read_file_list(self.file_list)[0])
        if self.num_samples == 0:
            raise ValueError(f"{file_list} lists no images")
        self._pipe = None

    @classmethod
    def for_split(cls, prepared: str, split: str, size: Union[int, Tuple[int, int]],
                  **kwargs) -> "ValBatches":
        """The split of a directory written by ``mixpipe data prepare``."""
        return cls(prepared, os.path.join(prepared, f"{split}_files.txt"), size, **kwargs)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1)
        def pipe():
            encoded, labels = fn.readers.file(file_root=self.file_root,
                                              file_list=self.file_list, random_shuffle=False,
                                              pad_last_batch=True, name="reader")
            images = fn.decoders.image(encoded, output_type=types.RGB,
                                       device="cpu" if self.device_id is None else "mixed")
            images = center_crop_graph(images, self.size, self.ratio)
            return fn.transpose(images, perm=[2, 0, 1]), labels

        p = pipe()
        p.build()
        return p

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None:
            self._pipe = self._build()
        else:
            self._pipe.reset()
        left = self.num_samples
        for b in range(len(self)):
            try:
                images, labels = self._pipe.run()
            except RuntimeError as err:
                self._pipe = None  # DALI says the pipeline is no longer valid
                raise self._named_error(b, err) from None
            if self.device_id is not None:
                images = images.as_cpu()
            take = min(left, self.batch_size)  # the last batch is padded by repeating
            x = torch.from_numpy(np.array(images.as_tensor())[:take])
            y = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)[:take].astype(np.int64))
            left -= take
            yield (x.cuda(self.device_id) if self.device_id is not None else x), y

    def _named_error(self, batch: int, err: RuntimeError) -> Exception:
        """DALI's decoder errors do not say which file failed: find it among the failing
        batch and the one prefetched after it, and name it."""
        from ..data.writers import decode_problem, read_file_list

        relpaths, _ = read_file_list(self.file_list)
        lo, hi = batch * self.batch_size, min(len(relpaths), (batch + 2) * self.batch_size)
        for rel in relpaths[lo:hi]:
            path = os.path.join(self.file_root, rel)
            problem = decode_problem(path)
            if problem is not None:
                return ValueError(f"{path}: not a readable image ({problem}); remove it from "
                                  f"{self.file_list} (`mixpipe data prepare tree --on-bad skip`"
                                  " leaves such files out)")
        return err

    def close(self) -> None:
        """Free the pipeline (its threads and buffers) now rather than at garbage collection."""
        if self._pipe is not None:
            from .iterator import close_pipeline

            close_pipeline(self._pipe)
            self._pipe = None
