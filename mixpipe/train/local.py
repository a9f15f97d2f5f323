"""LoCal+SGD: the early blocks learn by a local rule in the forward pass, the rest by SGD.

After Krithivasan, Sen, Venkataramani, Raghunathan, "Accelerating DNN Training Through Selective
Localized Learning" (Frontiers in Neuroscience, 2022). A model is cut into blocks (the stem and
residual blocks of a ResNet, the ``features`` blocks of a MobileNetV2, the children of an
``nn.Sequential``); blocks before the *transition index* ``t`` learn with the Oja rule of
:mod:`mixpipe.train.local_rule`, computed in a forward hook right after each conv / linear layer
has produced its output, and block ``t`` onwards trains with the user's optimiser through autograd.
``t`` moves deeper during training, by a static schedule or from the trend of the transition
block's updates (:mod:`mixpipe.train.local_select`).

How the early part avoids autograd, and how the optimiser stays consistent: the wrapper sets
``requires_grad = False`` on every parameter of a local block (and drops its ``.grad``). With the
input image not requiring grad either, autograd records nothing for those blocks: no graph, no
saved activations, no backward GEMMs, exactly as if they ran under ``torch.no_grad()`` (the first
SGD block is where the graph starts); the local update itself runs under ``torch.no_grad()``.
The optimiser may hold every parameter: a parameter whose ``.grad`` is None is skipped by
``torch.optim`` (no step, no weight decay, its momentum buffer untouched). :meth:`LocalSGD.
trainable_parameters` gives the SGD-trained ones for an optimiser built fresh. If the boundary ever
moves back (a static schedule may), the returning parameters' optimiser state is dropped when the
wrapper knows the optimiser, so a stale momentum buffer is not replayed.

The model object is not replaced: its ``forward``, ``state_dict`` and attributes stay as they are,
so :func:`mixpipe.train.adapt` (region pooling) and :func:`mixpipe.train.fit` take it unchanged.
BatchNorm layers in the local part stay in train mode: their batch statistics normalise the
forward and their running statistics keep updating (their affine parameters are frozen while
local); the local rule only runs while the layer's module is in train mode, so evaluation never
changes weights.

With :func:`mixpipe.train.fit`, no change to the loop is needed::

    local = LocalSGD(model, transition=DynamicTransition(), optimizer=optimizer)
    fit(model, loader, optimizer, epochs, on_epoch=local.on_epoch)

``on_epoch`` feeds the epoch's training loss to the weak supervision, records the transition
block's update, moves the boundary for the next epoch and adds ``local_*`` fields to fit's epoch
record. The local rate follows the optimiser's learning-rate schedule: it is scaled by the ratio of
the optimiser's current rate to its rate when the wrapper was built.

What it saves per step and end to end, and how noisy that is on a shared CPU, is measured by
``mixpipe bench local`` (figures in benchmarks/README.md, "LoCal+SGD").

Not supported: a model wrapped in DistributedDataParallel (it expects a fixed set of parameters
with gradients), and an input that itself requires grad (autograd would then record the local part).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .local_rule import OjaRule, apply_local_update
from .local_select import (DynamicTransition, StaticTransition, WeakSupervision, next_multiplier,
                           settled)

__all__ = ["Block", "split_blocks", "LocalSGD", "from_kind", "LOCAL_KINDS"]

LOCAL_KINDS = ("static", "dynamic")


class Block(NamedTuple):
    """One unit of the boundary: a name and the modules whose parameters it owns."""

    name: str
    modules: Tuple[nn.Module, ...]

    def parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def local_layers(self) -> List[nn.Module]:
        return [m for module in self.modules for m in module.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))]


def _children_blocks(prefix: str, module: nn.Module) -> List[Block]:
    if isinstance(module, nn.Sequential):
        return [Block(f"{prefix}.{name}", (child,)) for name, child in module.named_children()]
    return [Block(prefix, (module,))]


def split_blocks(model: nn.Module) -> List[Block]:
    """The model's blocks in forward order, found by attributes (torchvision names).

    * ``nn.Sequential``: each child.
    * ResNet-like (``conv1``, ``bn1``, ``layer1`` ...): the stem (conv1 + bn1), then every block
      of ``layer1``, ``layer2``, ... in order (:class:`~mixpipe.train.models.SmallResNet` too).
    * MobileNetV2-like (``features`` as an ``nn.Sequential``): each child of ``features``.

    The classifier is never a block: it always trains by SGD. Anything else: pass ``blocks``.
    """
    if isinstance(model, nn.Sequential):
        return [Block(name, (child,)) for name, child in model.named_children()]
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1")):
        blocks = [Block("stem", (model.conv1, model.bn1))]
        index = 1
        while hasattr(model, f"layer{index}"):
            blocks += _children_blocks(f"layer{index}", getattr(model, f"layer{index}"))
            index += 1
        return blocks
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return _children_blocks("features", features)
    raise TypeError(f"cannot split {type(model).__name__} into blocks: expected an nn.Sequential, "
                    "a ResNet-like model (conv1, bn1, layer1...) or a MobileNetV2-like model "
                    "(features as nn.Sequential); pass blocks=[...] explicitly")


Transition = Union[StaticTransition, DynamicTransition, int]


class LocalSGD:
    """Controls which blocks of ``model`` learn locally; see the module docstring.

    model: the network (changed in place: hooks and ``requires_grad`` flags, nothing else);
    blocks: its blocks in forward order (default :func:`split_blocks`); transition: a
    :class:`StaticTransition`, a :class:`DynamicTransition` or a fixed int; rule: the local rule;
    weak: the weak supervision; optimizer: the user's optimiser, read for its learning-rate
    schedule (and to drop stale state); max_transition: the deepest boundary (default: all blocks
    but the last); start: the dynamic rule's first boundary (default 0 = plain SGD).

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> local = LocalSGD(model, transition=StaticTransition(lambda epoch: min(epoch, 1)),
    ...                  optimizer=opt)
    >>> local.transition, [b.name for b in local.blocks]
    (0, ['0', '1', '2'])
    >>> local.end_epoch(0, train_loss=1.0)      # epoch 1: block '0' learns locally
    1
    >>> model[0].weight.requires_grad, model[2].weight.requires_grad
    (False, True)
    >>> len(list(local.trainable_parameters()))  # what SGD still trains
    2
    """

    def __init__(self, model: nn.Module, blocks: Optional[Sequence[Block]] = None,
                 transition: Transition = DynamicTransition(), rule: OjaRule = OjaRule(),
                 weak: WeakSupervision = WeakSupervision(),
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 max_transition: Optional[int] = None, start: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.blocks: List[Block] = list(blocks) if blocks is not None else split_blocks(model)
        if len(self.blocks) < 2:
            raise ValueError(f"LocalSGD needs at least 2 blocks, got {len(self.blocks)}")
        for block in self.blocks:
            if not isinstance(block, Block):
                raise TypeError(f"blocks must be Block(name, modules) tuples, got {block!r}")
        if max_transition is None:
            max_transition = len(self.blocks) - 1
        if not (isinstance(max_transition, int) and 0 <= max_transition <= len(self.blocks)):
            raise ValueError(f"max_transition must be an int in [0, {len(self.blocks)}], got "
                             f"{max_transition!r}")
        if not isinstance(transition, (StaticTransition, DynamicTransition, int)) or \
                isinstance(transition, bool):
            raise TypeError("transition must be a StaticTransition, a DynamicTransition or an "
                            f"int, got {transition!r}")
        if not isinstance(rule, OjaRule):
            raise TypeError(f"rule must be an OjaRule, got {rule!r}")
        if not isinstance(weak, WeakSupervision):
            raise TypeError(f"weak must be a WeakSupervision, got {weak!r}")
        self.max_transition = max_transition
        self.selector = transition
        self.rule = rule
        self.weak = weak
        self.optimizer = optimizer
        self._base_lr = None
        if optimizer is not None:
            self._base_lr = float(optimizer.param_groups[0]["lr"])
        self._original_grad = {id(p): p.requires_grad for b in self.blocks for p in b.parameters()}
        self._layer_block: Dict[int, int] = {}
        self._handles = []
        for index, block in enumerate(self.blocks):
            for layer in block.local_layers():
                if id(layer) in self._layer_block:
                    continue
                if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str)
                                                     or layer.padding_mode != "zeros"):
                    raise ValueError(f"block {block.name}: Conv2d with padding={layer.padding!r},"
                                     f" padding_mode={layer.padding_mode!r} is not supported by "
                                     "the local rule (numeric zero padding only)")
                self._layer_block[id(layer)] = index
                self._handles.append(layer.register_forward_hook(self._local_hook))
        self._handles.append(model.register_forward_pre_hook(self._count_step))
        # bookkeeping
        self.multiplier = 1.0
        self._previous_loss: Optional[float] = None
        self._norms: List[float] = []
        self._snapshot: List[torch.Tensor] = []
        self._epoch_steps = 0
        self._epoch_lr_sum = 0.0
        self._epoch_local_updates = 0
        self._epoch_local_ratio = 0.0
        self.history: List[Dict[str, Any]] = []
        self.transition = -1
        if isinstance(transition, StaticTransition):
            first = transition(0)
        elif isinstance(transition, DynamicTransition):
            first = start
        else:
            first = transition
        self._set(self._clip(first))

    # ------------------------------------------------------------------ boundary
    def _clip(self, t: int) -> int:
        return min(max(int(t), 0), self.max_transition)

    def _set(self, t: int) -> None:
        """Freeze blocks [0, t), restore the rest; snapshot the new transition block."""
        returning = []
        for index, block in enumerate(self.blocks):
            local = index < t
            for p in block.parameters():
                if local:
                    p.requires_grad_(False)
                    p.grad = None
                else:
                    if not p.requires_grad and self._original_grad[id(p)] and \
                            0 <= index < self.transition:
                        returning.append(p)
                    p.requires_grad_(self._original_grad[id(p)])
        if self.optimizer is not None:
            for p in returning:
                self.optimizer.state.pop(p, None)
        if t != self.transition:
            self._norms = []
        self.transition = t
        self._take_snapshot()

    def set_transition(self, t: int) -> None:
        """Put the boundary at ``t`` now (clipped to [0, max_transition])."""
        self._set(self._clip(t))

    def _transition_weights(self) -> List[torch.Tensor]:
        if self.transition >= len(self.blocks):
            return []
        return [layer.weight for layer in self.blocks[self.transition].local_layers()]

    def _take_snapshot(self) -> None:
        self._snapshot = [w.detach().clone() for w in self._transition_weights()]

    def transition_update_norm(self) -> Optional[float]:
        """‖W − W_snapshot‖ / ‖W_snapshot‖ over the transition block's conv / linear weights."""
        weights = self._transition_weights()
        if not weights or len(weights) != len(self._snapshot):
            return None
        diff = base = 0.0
        for w, s in zip(weights, self._snapshot):
            s = s.to(w.device)
            diff += float((w.detach().float() - s.float()).pow(2).sum())
            base += float(s.float().pow(2).sum())
        return math.sqrt(diff) / max(math.sqrt(base), 1e-30)

    def local_blocks(self) -> List[Block]:
        return self.blocks[:self.transition]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters SGD trains now (``requires_grad`` True), in model order."""
        return (p for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ hooks
    def lr_factor(self) -> float:
        """The optimiser's current rate over its rate when the wrapper was built (1 without)."""
        if self.optimizer is None or not self._base_lr:
            return 1.0
        return float(self.optimizer.param_groups[0]["lr"]) / self._base_lr

    def local_lr(self) -> float:
        return self.rule.lr * self.lr_factor() * self.multiplier

    def _count_step(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self._epoch_steps += 1
            self._epoch_lr_sum += self.lr_factor()

    def _local_hook(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not layer.training or self._layer_block[id(layer)] >= self.transition:
            return
        lr = self.local_lr()
        if lr <= 0:
            return
        ratio = apply_local_update(layer, args[0], output, lr, self.rule)
        self._epoch_local_updates += 1
        self._epoch_local_ratio += ratio

    # ------------------------------------------------------------------ epoch bookkeeping
    def observe_loss(self, loss: float) -> float:
        """Feed one training-loss observation to the weak supervision; returns the multiplier."""
        loss = float(loss)
        self.multiplier = next_multiplier(self.multiplier, self._previous_loss, loss, self.weak)
        if math.isfinite(loss):
            self._previous_loss = loss
        return self.multiplier

    def end_epoch(self, epoch: int, train_loss: Optional[float] = None) -> int:
        """Close epoch ``epoch``: weak supervision, the transition's update record, the boundary
        for the next epoch. Returns the next epoch's transition index."""
        during = self.transition
        if train_loss is not None:
            self.observe_loss(train_loss)
        norm = self.transition_update_norm()
        steps = self._epoch_steps
        mean_lr = self._epoch_lr_sum / steps if steps else 1.0
        signal = norm
        if norm is not None and isinstance(self.selector, DynamicTransition) and \
                self.selector.normalise_by_lr and mean_lr > 0:
            signal = norm / mean_lr
        if signal is not None:
            self._norms.append(signal)
        if isinstance(self.selector, StaticTransition):
            nxt = self._clip(self.selector(epoch + 1))
        elif isinstance(self.selector, DynamicTransition):
            nxt = during
            if during < self.max_transition and settled(self._norms, self.selector):
                nxt = during + 1
        else:
            nxt = self._clip(self.selector)
        record = {
            "epoch": int(epoch), "transition": during, "next_transition": nxt,
            "local_blocks": [b.name for b in self.blocks[:during]],
            "update_norm": norm, "update_signal": signal, "lr_multiplier": self.multiplier,
            "train_steps": steps, "local_updates": self._epoch_local_updates,
            "mean_local_update": (self._epoch_local_ratio / self._epoch_local_updates
                                  if self._epoch_local_updates else 0.0),
        }
        self.history.append(record)
        self._epoch_steps = 0
        self._epoch_lr_sum = 0.0
        self._epoch_local_updates = 0
        self._epoch_local_ratio = 0.0
        if nxt != during:
            self._set(nxt)
        else:
            self._take_snapshot()
        return nxt

    def on_epoch(self, record: Dict[str, Any]) -> None:
        """``fit(..., on_epoch=local.on_epoch)``: closes the epoch and annotates fit's record."""
        nxt = self.end_epoch(int(record["epoch"]), record.get("train_loss"))
        last = self.history[-1]
        record["local_transition"] = last["transition"]
        record["local_next_transition"] = nxt
        record["local_update_norm"] = last["update_norm"]
        record["local_lr_multiplier"] = last["lr_multiplier"]

    # ------------------------------------------------------------------ lifecycle
    def state_dict(self) -> Dict[str, Any]:
        return {"transition": self.transition, "multiplier": self.multiplier,
                "previous_loss": self._previous_loss, "norms": list(self._norms),
                "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("transition", "multiplier", "previous_loss", "norms", "history"):
            if key not in state:
                raise KeyError(f"LocalSGD state lacks {key!r}")
        self._set(self._clip(state["transition"]))
        self.multiplier = float(state["multiplier"])
        self._previous_loss = state["previous_loss"]
        self._norms = [float(v) for v in state["norms"]]
        self.history = [dict(r) for r in state["history"]]

    def remove(self) -> None:
        """Detach from the model: hooks removed, every ``requires_grad`` flag restored."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in self.blocks:
            for p in block.parameters():
                p.requires_grad_(self._original_grad[id(p)])
        self.transition = 0


def from_kind(kind: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
              epochs: int, rule: OjaRule = OjaRule(),
              dynamic: DynamicTransition = DynamicTransition(),
              weak: WeakSupervision = WeakSupervision(),
              max_transition: Optional[int] = None) -> LocalSGD:
    """The ``--local static|dynamic`` wrapper with our defaults: static = the linear ramp of
    :meth:`StaticTransition.linear` over ``epochs``; dynamic = ``dynamic``."""
    if kind not in LOCAL_KINDS:
        raise ValueError(f"local kind must be one of {LOCAL_KINDS}, got {kind!r}")
    blocks = split_blocks(model)
    top = len(blocks) - 1 if max_transition is None else max_transition
    selector: Transition = StaticTransition.linear(epochs, top) if kind == "static" else dynamic
    return LocalSGD(model, blocks, selector, rule, weak, optimizer, max_transition=top)
