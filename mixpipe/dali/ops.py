"""Mixing as DALI graph functions, built only from native DALI operators.

Use them inside a ``@pipeline_def(enable_conditionals=True)`` function, between the source and the
normalisation::

    inputs = plan_inputs(source)                     # fn.external_source over a PlanSource
    images = mix(inputs, device="mixed")             # decode + view each constituent, compose
    images = fn.crop_mirror_normalize(images, ...)   # your usual tail

Where things run: the source (file reads, plan rows, crop windows) is host work in DALI's worker
processes. With ``device="mixed"`` the decoder hands GPU images to ``resize``/``flip``/``cat`` and
the blend arithmetic, so every mixing operator runs on the GPU; the only host-side additions are
the per-sample predicates of the conditionals (a comparison on a scalar) and slicing the small
``geometry`` rows, which are CPU argument inputs either way. On a CPU-only pipeline
(``device="cpu"``) the same graph runs on the CPU.

Per-sample conditionals route each slot: a SINGLE slot decodes one image, a pair two, a quad four.
Constituent streams beyond a slot's count are empty byte arrays and never reach a decoder.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

from nvidia.dali import fn, types
import nvidia.dali.math as dmath

from ..core.plan import Layout
from .source import PlanSource

__all__ = ["MixInputs", "plan_inputs", "decode_view", "mix", "compose"]


class MixInputs(NamedTuple):
    """The DataNodes of one :class:`PlanSource` stream (see its docstring for shapes)."""

    encoded: List
    geometry: object
    targets: object
    weights: object
    ids: object
    loss_scale: object
    layout: object
    count: object


def plan_inputs(source: PlanSource, parallel: bool = True, prefetch_queue_depth: int = 2,
                name: Optional[str] = None) -> MixInputs:
    """``fn.external_source`` over ``source`` in per-sample mode; its outputs as :class:`MixInputs`.

    With ``parallel=True`` the callback runs in the pipeline's ``py_num_workers`` processes
    (pass ``py_start_method="spawn"`` to the pipeline when CUDA is initialised in the parent).
    """
    extra = {"prefetch_queue_depth": prefetch_queue_depth} if parallel else {}
    outs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                              parallel=parallel, name=name, **extra)
    idx = source.outputs
    return MixInputs([outs[i] for i in idx.encoded], outs[idx.geometry], outs[idx.targets],
                     outs[idx.weights], outs[idx.ids], outs[idx.loss_scale], outs[idx.layout],
                     outs[idx.count])


def decode_view(encoded, geometry, index: int, device: str = "cpu"):
    """Decode constituent ``index`` inside its crop window, resize to its region, mirror.

    ROI decoding (``decoders.image_slice``) decodes only the crop; the resize is antialiased
    bilinear like the reference composer's. EXIF orientation is ignored because the crop window
    was computed on the stored pixel grid.
    """
    row = geometry[index]
    image = fn.decoders.image_slice(encoded, row[0:2], row[2:4], axis_names="HW",
                                    device=device, output_type=types.RGB,
                                    adjust_orientation=False)
    image = fn.resize(image, size=fn.cast(row[4:6], dtype=types.FLOAT), antialias=True,
                      interp_type=types.INTERP_LINEAR)
    return fn.flip(image, horizontal=row[6])


def _weight(inputs: MixInputs, index: int, image):
    w = inputs.weights[index]
    return w.gpu() if image.device == "gpu" else w


def compose(constituents: list, inputs: MixInputs, layout: Layout):
    """Compose already-viewed constituents for one (statically known) layout.

    Spatial layouts concatenate: constituent regions tile the composite exactly (HALVES: left,
    right; QUADS: TL, TR, BL, BR) because their sizes came from :func:`mixpipe.core.layouts.regions`.
    BLEND sums in float32 and rounds half up, as the reference does.
    """
    if layout == Layout.HALVES:
        return fn.cat(constituents[0], constituents[1], axis=1)
    if layout == Layout.QUADS:
        top = fn.cat(constituents[0], constituents[1], axis=1)
        bottom = fn.cat(constituents[2], constituents[3], axis=1)
        return fn.cat(top, bottom, axis=0)
    if layout == Layout.BLEND:
        acc = None
        for i, image in enumerate(constituents):
            term = image * _weight(inputs, i, image)
            acc = term if acc is None else acc + term
        return fn.cast(dmath.floor(acc + 0.5), dtype=types.UINT8)
    raise ValueError(f"compose() takes BLEND, HALVES or QUADS, got {Layout(layout).name}")


ViewFn = Callable[[object, object, int, str], object]


def mix(inputs: MixInputs, view: ViewFn = decode_view, device: str = "cpu"):
    """Per-slot composite (HWC uint8) of the source's constituents; needs conditionals enabled.

    ``view(encoded, geometry, index, device)`` turns constituent ``index`` into an HWC image of
    its region's size (default :func:`decode_view`); it is called only inside the branches whose
    slots have that constituent, so a SINGLE slot pays for one decode.
    """
    k = len(inputs.encoded)
    first = view(inputs.encoded[0], inputs.geometry, 0, device)
    out = first
    if k >= 2:
        out = _mixed(inputs, view, device, first, k)
    return out


def _mixed(inputs: MixInputs, view: ViewFn, device: str, first, k: int):
    # Split off so that the conditionals below see only statically known Python values of k.
    out = first
    if inputs.count > 1:
        second = view(inputs.encoded[1], inputs.geometry, 1, device)
        if inputs.layout == int(Layout.HALVES):
            out = compose([first, second], inputs, Layout.HALVES)
        else:
            out = _blend_or_quads(inputs, view, device, first, second, k)
    return out


def _blend_or_quads(inputs: MixInputs, view: ViewFn, device: str, first, second, k: int):
    if k < 4:
        return _blend(inputs, view, device, [first, second], k)
    if inputs.layout == int(Layout.QUADS):
        third = view(inputs.encoded[2], inputs.geometry, 2, device)
        fourth = view(inputs.encoded[3], inputs.geometry, 3, device)
        out = compose([first, second, third, fourth], inputs, Layout.QUADS)
    else:
        out = _blend(inputs, view, device, [first, second], k)
    return out


def _blend(inputs: MixInputs, view: ViewFn, device: str, images: list, k: int):
    acc = images[0] * _weight(inputs, 0, images[0]) + images[1] * _weight(inputs, 1, images[1])
    for index in range(2, k):  # a static Python loop: one conditional per extra stream
        acc = _add_if_present(inputs, view, device, acc, index)
    return fn.cast(dmath.floor(acc + 0.5), dtype=types.UINT8)


def _add_if_present(inputs: MixInputs, view: ViewFn, device: str, acc, index: int):
    if inputs.count > index:
        image = view(inputs.encoded[index], inputs.geometry, index, device)
        acc = acc + image * _weight(inputs, index, image)
    return acc
