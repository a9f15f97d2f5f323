"""Mixing as DALI graph functions, built only from native DALI operators.

Use them inside a ``@pipeline_def(enable_conditionals=True)`` function, between the source and the
normalisation::

    inputs = plan_inputs(source)                     # fn.external_source over a SlotSource
    images = mix(inputs, device="mixed")             # decode + view each constituent, compose
    images = fn.crop_mirror_normalize(images, ...)   # your usual tail, WITHOUT mirror=

Where things run: the source (file reads, plan rows, crop windows) is host work in DALI's worker
processes, a whole batch per call, delivered as ready-typed outputs (one per field and per
constituent stream), so the graph needs no per-sample unpacking or casting. With
``device="mixed"`` the decoder hands GPU images to ``resize``/``flip``/``cat`` and the blend
arithmetic, so every mixing operator runs on the GPU; the only host-side additions are the
per-sample predicates of the conditionals (a comparison on a scalar). The view geometry is a CPU
argument input of the GPU operators either way. On a CPU-only pipeline (``device="cpu"``) the same
graph runs on the CPU.

Never mirror the composite: each constituent is already mirrored inside its own region (the
view's flip), and a mirror after ``mix()`` (``fn.flip``, or ``crop_mirror_normalize``'s
``mirror=``) swaps the regions of a HALVES or QUADS composite while the targets stay in plan
order, so the labels no longer match the pixels. :class:`mixpipe.dali.MixIterator` refuses such
a pipeline (:func:`refuse_whole_batch_mirror`).

Per-sample conditionals route each slot: a SINGLE slot decodes one image, a pair two, a quad four.
A constituent stream is decoded only inside the branches that use it, so absent ones (empty
byte arrays) are never touched.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Set

from nvidia.dali import fn, types
import nvidia.dali.math as dmath

from ..core.plan import Layout
from .source import CONSTITUENT_FIELDS, SLOT_FIELDS, SlotBatches, SlotSource

__all__ = ["MixInputs", "Constituent", "plan_inputs", "constituent_bytes", "constituent_geometry",
           "decode_view", "mix", "compose", "whole_batch_mirrors", "refuse_whole_batch_mirror"]

#: Names of the DataNodes mix() returned: the composites a later mirror must not touch.
_MIX_OUTPUTS: Set[str] = set()


class Constituent(NamedTuple):
    """One constituent stream's source outputs (CPU nodes): the ``file`` (uint8: a path when
    the source :attr:`~mixpipe.dali.SlotSource.reads_paths`, else the encoded bytes; empty when
    the slot has no such constituent; :func:`constituent_bytes` gives the bytes), the crop
    window's int32[2] ``anchor`` (top, left) and
    int32[2] ``shape`` (height, width), the float32[2] ``region`` (height, width) it is resized
    to, and the int32 mirror ``flip``."""

    file: object
    anchor: object
    shape: object
    region: object
    flip: object


class MixInputs(NamedTuple):
    """The source's outputs as graph nodes: per slot ``targets``/``ids`` int64[K],
    ``weights``/``loss_scale`` float32[K], ``layout`` uint8 and ``count`` int32, and one
    :class:`Constituent` per stream. ``reads_paths``: the streams carry paths, read in the
    graph."""

    max_constituents: int
    targets: object
    weights: object
    ids: object
    loss_scale: object
    layout: object
    count: object
    constituents: tuple
    reads_paths: bool


def plan_inputs(source: SlotSource, parallel: bool = True, prefetch_queue_depth: int = 2,
                name: Optional[str] = None) -> MixInputs:
    """``fn.external_source`` over ``source`` in batch mode, as :class:`MixInputs`.

    Call inside a pipeline definition: the source hands out batches of the pipeline's
    ``batch_size``. With ``parallel=True`` whole batches are built in the pipeline's
    ``py_num_workers`` processes (pass ``py_start_method="spawn"`` to the pipeline when CUDA is
    initialised in the parent).
    """
    from nvidia.dali.pipeline import Pipeline

    pipeline = Pipeline.current()
    if pipeline is None:
        raise RuntimeError("plan_inputs() builds graph nodes: call it inside a @pipeline_def "
                           "function (or a `with pipeline:` block)")
    extra = {"prefetch_queue_depth": prefetch_queue_depth} if parallel else {}
    outputs = fn.external_source(source=SlotBatches(source, pipeline.max_batch_size),
                                 num_outputs=source.num_outputs, batch=True, batch_info=True,
                                 parallel=parallel, name=name, **extra)
    slot = dict(zip(SLOT_FIELDS, outputs))
    per = len(CONSTITUENT_FIELDS)
    streams = tuple(Constituent(*outputs[len(SLOT_FIELDS) + per * i:
                                         len(SLOT_FIELDS) + per * (i + 1)])
                    for i in range(source.max_constituents))
    return MixInputs(source.max_constituents, slot["targets"], slot["weights"], slot["ids"],
                     slot["loss_scale"], slot["layout"], slot["count"], streams,
                     source.reads_paths)


def constituent_bytes(inputs: MixInputs, index: int):
    """Constituent ``index``'s encoded file (uint8). Call it inside the branch that decodes it:
    with file paths the read is an operator, and a slot without that constituent has an empty
    path."""
    stream = inputs.constituents[index]
    if not inputs.reads_paths:
        return stream.file
    # plain reads: mapping each small file cost more CPU than reading it (32 px JPEGs here:
    # 1.6x the plain pipeline's CPU per image with mmap, 1.2x without)
    return fn.io.file.read(stream.file, dont_use_mmap=True)


def constituent_geometry(inputs: MixInputs, index: int) -> Constituent:
    """Constituent ``index``'s stream: bytes and view geometry (see :class:`Constituent`)."""
    return inputs.constituents[index]


def decode_view(inputs: MixInputs, index: int, device: str = "cpu"):
    """Decode constituent ``index`` inside its crop window, resize to its region, mirror.

    ROI decoding (``decoders.image_slice``) decodes only the crop; the resize is antialiased
    bilinear like the reference composer's. EXIF orientation is ignored because the crop window
    was computed on the stored pixel grid.
    """
    stream = inputs.constituents[index]
    image = fn.decoders.image_slice(constituent_bytes(inputs, index), stream.anchor, stream.shape,
                                    axis_names="HW", device=device, output_type=types.RGB,
                                    adjust_orientation=False)
    image = fn.resize(image, size=stream.region, antialias=True,
                      interp_type=types.INTERP_LINEAR)
    return fn.flip(image, horizontal=stream.flip)


def _weight(inputs: MixInputs, index: int, image):
    w = inputs.weights[index]
    return w.gpu() if image.device == "gpu" else w


def compose(constituents: list, inputs: MixInputs, layout: Layout):
    """Compose already-viewed constituents for one (statically known) layout.

    Spatial layouts concatenate: constituent regions tile the composite exactly (HALVES: left,
    right; QUADS: TL, TR, BL, BR) because their sizes came from
    :func:`mixpipe.core.layouts.regions`.
    BLEND sums in float32 and rounds half up, as the reference does.
    """
    if layout == Layout.HALVES:
        return fn.cat(constituents[0], constituents[1], axis=1)
    if layout == Layout.QUADS:
        top = fn.cat(constituents[0], constituents[1], axis=1)
        bottom = fn.cat(constituents[2], constituents[3], axis=1)
        return fn.cat(top, bottom, axis=0)
    if layout == Layout.BLEND:
        acc = None  # one arithmetic expression, which DALI evaluates as a single fused operator
        for i, image in enumerate(constituents):
            term = image * _weight(inputs, i, image)
            acc = term if acc is None else acc + term
        return fn.cast(dmath.floor(acc + 0.5), dtype=types.UINT8)
    raise ValueError(f"compose() takes BLEND, HALVES or QUADS, got {Layout(layout).name}")


ViewFn = Callable[[MixInputs, int, str], object]


def mix(inputs: MixInputs, view: ViewFn = decode_view, device: str = "cpu"):
    """Per-slot composite (HWC uint8) of the source's constituents; needs conditionals enabled.

    ``view(inputs, index, device)`` turns constituent ``index`` into an HWC image of its
    region's size (default :func:`decode_view`; use :func:`constituent_bytes` and
    :func:`constituent_geometry` in your own). Each stream is viewed once, in the branch of the
    slots that have it (every slot has a first constituent; the second is viewed under
    ``count > 1``, and so on), then the slot's layout picks the composition: a SINGLE slot pays
    for one decode. What crosses a branch boundary is the small source tensors, the viewed uint8
    constituents and the finished uint8 composite, never a float accumulator.
    """
    k = inputs.max_constituents
    first = view(inputs, 0, device)  # every slot has a first constituent
    out = first if k < 2 else _route(inputs, view, device, k, [first])
    _MIX_OUTPUTS.add(out.name)
    return out


def _route(inputs: MixInputs, view: ViewFn, device: str, k: int, views: list):
    """Route the slots that have at least ``len(views)`` constituents, whose first ones are
    already viewed; the next stream is viewed once, for every slot that has it."""
    n = len(views)  # a Python int: the conditionals below only branch on the slot's tensors
    if n == k:
        return _exactly(inputs, views)
    if inputs.count == n:
        out = _exactly(inputs, views)
    else:
        out = _route(inputs, view, device, k, views + [view(inputs, n, device)])
    return out


def _exactly(inputs: MixInputs, views: list):
    """Compose slots of exactly ``len(views)`` constituents (each count has at most two layouts:
    2 = HALVES or BLEND, 4 = QUADS or BLEND, 3 = BLEND)."""
    n = len(views)
    if n == 1:
        return views[0]
    spatial = {2: Layout.HALVES, 4: Layout.QUADS}.get(n)
    if spatial is None:
        return compose(views, inputs, Layout.BLEND)
    if inputs.layout == int(spatial):
        out = compose(views, inputs, spatial)
    else:
        out = compose(views, inputs, Layout.BLEND)
    return out


# ----------------------------------------------------------------------- mirror check
#: Operators that mirror, and the constant arguments that make them do so.
_MIRRORS = {"CropMirrorNormalize": ("mirror",), "Flip": ("horizontal", "vertical", "depthwise")}


def _constant_args(spec) -> Dict[str, str]:
    """``name: value`` lines of an OpSpec's printout (DALI exposes no argument getter)."""
    args = {}
    for line in str(spec).split("Arguments:", 1)[-1].splitlines():
        name, sep, value = line.strip().partition(": ")
        if sep:
            args[name] = value.strip()
    return args


def whole_batch_mirrors(pipeline) -> List[str]:
    """Operators of ``pipeline`` that may mirror a composite made by :func:`mix` (names, empty
    when none). A mirror is any ``fn.flip`` or ``crop_mirror_normalize`` downstream of a
    ``mix()`` output with a non-zero constant mirror argument or a per-sample argument input
    (``mirror=fn.random.coin_flip()``)."""
    if not getattr(pipeline, "_py_graph_built", True):
        pipeline._build_graph()
    ops = list(getattr(pipeline, "_ops", None) or ())
    producer = {node.name: op for op in ops for node in op._outputs}
    found = []
    for op in ops:
        schema = getattr(op._op, "schema_name", "")
        if schema not in _MIRRORS:
            continue
        spec = op.spec
        constants = _constant_args(spec)
        mirrors = any(constants.get(a, "0") not in ("0", "False") for a in _MIRRORS[schema])
        if not mirrors and spec.NumInput() <= spec.NumRegularInput():
            continue
        # walk the image input upstream looking for a composite
        stack, seen = [op._inputs[0].name], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in _MIX_OUTPUTS:
                found.append(op.name)
                break
            up = producer.get(name)
            if up is not None:
                regular = up.spec.NumRegularInput()
                stack += [node.name for node in up._inputs[:regular]]
    return found


def refuse_whole_batch_mirror(pipeline) -> None:
    """Raise if ``pipeline`` mirrors a composite after :func:`mix` (see the module docstring).

    DALI's graph internals are not a public API: if they change, the check finds nothing rather
    than failing a good pipeline.
    """
    try:
        found = whole_batch_mirrors(pipeline)
    except (AttributeError, IndexError, TypeError):
        return
    if found:
        raise ValueError(f"the pipeline mirrors the mixed composite after mix() "
                         f"({', '.join(found)})"
                         ": that swaps a composite's regions against its labels. Drop mirror= "
                         "from crop_mirror_normalize / the fn.flip; mixpipe mirrors each "
                         "constituent inside its region already (the view's flip)")
