"""Mixing as DALI graph functions, built only from native DALI operators.

Use them inside a ``@pipeline_def(enable_conditionals=True)`` function, between the source and the
normalisation::

    inputs = plan_inputs(source)                     # fn.external_source over a SlotSource
    images = mix(inputs, device="mixed")             # decode + view each constituent, compose
    images = fn.crop_mirror_normalize(images, ...)   # your usual tail, WITHOUT mirror=

Where things run: the source (file reads, plan rows, crop windows) is host work in DALI's worker
processes. With ``device="mixed"`` the decoder hands GPU images to ``resize``/``flip``/``cat`` and
the blend arithmetic, so every mixing operator runs on the GPU; the only host-side additions are
the per-sample predicates of the conditionals (a comparison on a scalar), unpacking the small
``meta`` rows (subscripts and casts on a few numbers per sample; they are CPU argument inputs
of the GPU operators either way) and cutting each file out of the slot's byte blob, which a
mixed decoder reads on the host anyway. On a CPU-only pipeline (``device="cpu"``) the same
graph runs on the CPU.

Never mirror the composite: each constituent is already mirrored inside its own region (the
view's flip), and a mirror after ``mix()`` (``fn.flip``, or ``crop_mirror_normalize``'s
``mirror=``) swaps the regions of a HALVES or QUADS composite while the targets stay in plan
order, so the labels no longer match the pixels. :class:`mixpipe.dali.MixIterator` refuses such
a pipeline (:func:`refuse_whole_batch_mirror`).

Per-sample conditionals route each slot: a SINGLE slot decodes one image, a pair two, a quad four.
A constituent's bytes are cut out inside the branches that use it, so absent ones are never
touched.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Set

from nvidia.dali import fn, types
import nvidia.dali.math as dmath

from ..core.plan import Layout
from .source import GEOMETRY_FIELDS, META, SlotSource

__all__ = ["MixInputs", "plan_inputs", "constituent_bytes", "constituent_geometry",
           "decode_view", "mix", "compose", "whole_batch_mirrors", "refuse_whole_batch_mirror"]

#: Names of the DataNodes mix() returned: the composites a later mirror must not touch.
_MIX_OUTPUTS: Set[str] = set()


class MixInputs(NamedTuple):
    """The source's two outputs and the per-slot tensors unpacked from ``meta`` (CPU nodes).

    ``targets``/``ids`` int64[K], ``weights``/``loss_scale`` float32[K], ``layout`` uint8 and
    ``count`` int32 per slot. Per-constituent pieces (bytes, view geometry, weight) are cut out
    lazily by :func:`constituent_bytes` and friends, inside the branches that need them.
    """

    blob: object
    meta: object
    max_constituents: int
    targets: object
    weights: object
    ids: object
    loss_scale: object
    layout: object
    count: object


def plan_inputs(source: SlotSource, parallel: bool = True, prefetch_queue_depth: int = 2,
                name: Optional[str] = None) -> MixInputs:
    """``fn.external_source`` over ``source`` in per-sample mode, unpacked as :class:`MixInputs`.

    With ``parallel=True`` the callback runs in the pipeline's ``py_num_workers`` processes
    (pass ``py_start_method="spawn"`` to the pipeline when CUDA is initialised in the parent).
    """
    extra = {"prefetch_queue_depth": prefetch_queue_depth} if parallel else {}
    blob, meta = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                    parallel=parallel, name=name, **extra)
    column = lambda field, dtype: fn.cast(meta[:, META[field]], dtype=dtype)  # noqa: E731
    return MixInputs(blob, meta, source.max_constituents,
                     column("target", types.INT64), column("weight", types.FLOAT),
                     column("id", types.INT64), column("loss_scale", types.FLOAT),
                     fn.cast(meta[0, META["layout"]], dtype=types.UINT8),
                     fn.cast(meta[0, META["count"]], dtype=types.INT32))


def constituent_bytes(inputs: MixInputs, index: int):
    """Constituent ``index``'s encoded file, cut out of the slot's blob (no copy in Python)."""
    start = fn.cast(inputs.meta[index, META["byte_offset"]:META["byte_offset"] + 1],
                    dtype=types.INT32)
    length = fn.cast(inputs.meta[index, META["byte_length"]:META["byte_length"] + 1],
                     dtype=types.INT32)
    return fn.slice(inputs.blob, start, length, axes=[0], normalized_anchor=False,
                    normalized_shape=False)


def constituent_geometry(inputs: MixInputs, index: int):
    """int32[7] view geometry of constituent ``index`` (see ``GEOMETRY_FIELDS``)."""
    return fn.cast(inputs.meta[index, 0:len(GEOMETRY_FIELDS)], dtype=types.INT32)


def decode_view(inputs: MixInputs, index: int, device: str = "cpu"):
    """Decode constituent ``index`` inside its crop window, resize to its region, mirror.

    ROI decoding (``decoders.image_slice``) decodes only the crop; the resize is antialiased
    bilinear like the reference composer's. EXIF orientation is ignored because the crop window
    was computed on the stored pixel grid.
    """
    row = constituent_geometry(inputs, index)
    image = fn.decoders.image_slice(constituent_bytes(inputs, index), row[0:2], row[2:4],
                                    axis_names="HW", device=device, output_type=types.RGB,
                                    adjust_orientation=False)
    image = fn.resize(image, size=fn.cast(row[4:6], dtype=types.FLOAT), antialias=True,
                      interp_type=types.INTERP_LINEAR)
    return fn.flip(image, horizontal=row[6])


def _weight(inputs: MixInputs, index: int, image):
    w = fn.cast(inputs.meta[index, META["weight"]], dtype=types.FLOAT)
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
    :func:`constituent_geometry` in your own). The branches are decided on the slot's count and
    layout first and every constituent is viewed inside the leaf that composes it: a SINGLE
    slot pays for one decode, and what crosses a branch boundary is only the small source
    tensors on the way in and the finished uint8 composite on the way out (never a float
    accumulator).
    """
    k = inputs.max_constituents
    out = view(inputs, 0, device) if k < 2 else _route(inputs, view, device, k)
    _MIX_OUTPUTS.add(out.name)
    return out


def _route(inputs: MixInputs, view: ViewFn, device: str, k: int):
    # Split off from mix() so that the conditionals only see statically known Python ints.
    if inputs.count == 1:
        out = view(inputs, 0, device)
    elif inputs.layout == int(Layout.HALVES):
        out = compose([view(inputs, i, device) for i in range(2)], inputs, Layout.HALVES)
    else:
        out = _quads_or_blend(inputs, view, device, k)
    return out


def _quads_or_blend(inputs: MixInputs, view: ViewFn, device: str, k: int):
    if k < 4:
        return _blend(inputs, view, device, 2, k)
    if inputs.layout == int(Layout.QUADS):
        out = compose([view(inputs, i, device) for i in range(4)], inputs, Layout.QUADS)
    else:
        out = _blend(inputs, view, device, 2, k)
    return out


def _blend(inputs: MixInputs, view: ViewFn, device: str, n: int, k: int):
    """BLEND of exactly ``count`` constituents: one branch per possible count from ``n`` up."""
    if n >= k:
        return compose([view(inputs, i, device) for i in range(n)], inputs, Layout.BLEND)
    if inputs.count == n:
        out = compose([view(inputs, i, device) for i in range(n)], inputs, Layout.BLEND)
    else:
        out = _blend(inputs, view, device, n + 1, k)
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
