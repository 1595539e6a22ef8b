"""wrap(): put a Monitor in front of a PyTorch model without changing what the model does.

The wrapper returns the very object the model returned. It shares the model's parameter,
buffer and submodule tables instead of registering the model as a child, so ``state_dict()``
keys, ``named_parameters()``, ``.to()`` and checkpoint loading are exactly the bare model's,
even when the wrapper is nested inside a larger module.

Training mode: by default nothing is monitored while ``model.training`` is True (training
batches are not production traffic, and augmentations would pollute the statistics); pass
``monitor_training=True`` to monitor anyway. Monitoring always works on detached copies, so it
never keeps the autograd graph alive.

Placement: wrap the outermost module that serving calls, e.g. ``wrap(DataParallel(model))``
rather than ``DataParallel(wrap(model))``. Inputs for the label queue are taken from the first
positional argument; a model called with keyword arguments only is monitored without inputs.
``torch.compile(wrap(model), fullgraph=True)`` is impossible by design: monitoring is kept out
of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from oodmon.monitor import Monitor

__all__ = ["MonitoredModel", "OutputSelector", "select_output", "wrap"]

OutputSelector = int | str | Callable[[Any], Tensor] | None

# Bound once: looking it up through `torch.compiler` costs a cold calling thread a few us per call.
_is_compiling = torch.compiler.is_compiling

_SHARED_TABLES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class MonitoredModel(nn.Module):
    """A model whose forward also reports its outputs to a Monitor. Build it with :func:`wrap`."""

    model: nn.Module
    monitor: Monitor

    def __init__(
        self,
        model: nn.Module,
        monitor: Monitor,
        output: OutputSelector = None,
        *,
        background: bool = True,
        monitor_training: bool = False,
        copy_inputs: bool = True,
    ) -> None:
        super().__init__()
        # Share the model's tables: same keys, same tensors, same hooks on submodules, and
        # the root's own state-dict hooks.
        for table in _SHARED_TABLES:
            setattr(self, table, getattr(model, table))
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "monitor", monitor)
        self.training = model.training
        self._output = output
        self._background = background
        self._monitor_training = monitor_training
        self._copy_inputs = copy_inputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model and report its outputs; returns exactly what the model returned."""
        result = self.model(*args, **kwargs)
        if self.model.training and not self._monitor_training:
            self.monitor.warn_once(
                "training_mode",
                f"oodmon monitor {self.monitor.name!r}: the wrapped model is in training mode, "
                "so its outputs are not monitored; call .eval() for inference "
                "(or wrap with monitor_training=True).",
            )
            return result
        if _is_compiling():
            # Under torch.compile, report from outside the graph. Decided here, at call time:
            # a `@torch.compiler.disable` decorator would import torch._dynamo (seconds) with
            # oodmon, for every user, compiling or not.
            torch.compiler.disable(self._report)(result, args)
        else:
            self._report(result, args)
        return result

    def _report(self, result: Any, args: tuple[Any, ...]) -> None:
        try:
            logits = select_output(result, self._output)
            inputs = None
            if self.monitor.queue is not None and args and isinstance(args[0], Tensor):
                inputs = args[0].detach() if args[0].requires_grad else args[0]
            if self._background:
                self.monitor.submit(logits, inputs, copy_inputs=self._copy_inputs)
            else:
                self.monitor.observe(logits, inputs)
        except Exception as err:  # never break inference (strict monitors re-raise)
            self.monitor.record_error("wrap", err)

    def train(self, mode: bool = True) -> MonitoredModel:
        """Set the model's mode (and this wrapper's); monitoring follows the model's mode."""
        self.model.train(mode)
        self.training = mode
        return self

    # The root model's own state (parameters, buffers, extra state) and its overrides of
    # these hooks are the model's business: delegate, so checkpoints match the bare model's.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.model._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        self.model._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Any, recurse: bool = True) -> MonitoredModel:
        self.model._apply(fn, recurse)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> MonitoredModel:
        """A copy of the model reporting to the same Monitor (EMA copies, quantisation)."""
        import copy

        return MonitoredModel(
            copy.deepcopy(self.model, memo),
            self.monitor,
            self._output,
            background=self._background,
            monitor_training=self._monitor_training,
            copy_inputs=self._copy_inputs,
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "A wrapped model cannot be pickled whole (its Monitor holds threads and sinks): "
            "save `wrapped.state_dict()` (the bare model's keys) or `wrapped.model`, and wrap "
            "again after loading."
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["model"], name)

    def extra_repr(self) -> str:
        """Name the monitor in the module's repr."""
        return f"monitor={self.monitor!r}"


def select_output(result: Any, output: OutputSelector = None) -> Tensor:
    """Pick the logits out of whatever a model returns.

    Args:
        result: the model's return value: a tensor, a tuple/list, a dict or an object with
            attributes (dataclass-like outputs).
        output: None to guess in a documented order (the tensor itself; the first element of
            a tuple; ``["logits"]`` of a mapping; ``.logits`` of an object), an int index, a
            key or attribute name, or a callable ``result -> Tensor``.

    Raises:
        TypeError: nothing that looks like logits was found.
    """
    if output is None:
        if isinstance(result, Tensor):
            return result
        if isinstance(result, (tuple, list)) and result and isinstance(result[0], Tensor):
            return result[0]
        if isinstance(result, Mapping) and "logits" in result:
            return result["logits"]
        if hasattr(result, "logits"):
            return result.logits
        raise TypeError(
            f"Cannot find the logits in a {type(result).__name__} output; pass "
            "`output=` (an index, a key, an attribute name or a function) to oodmon.wrap."
        )
    if callable(output):
        return output(result)
    if isinstance(output, int):
        return result[output]
    if isinstance(result, Mapping):
        return result[output]
    return getattr(result, output)


def _known_output_width(model: nn.Module) -> int | None:
    """The output width of a model whose last registered layer is a Linear, else None."""
    leaves = [m for m in model.modules() if not list(m.children())]
    if leaves and isinstance(leaves[-1], nn.Linear):
        return int(leaves[-1].out_features)
    return None


def wrap(
    model: nn.Module,
    monitor: Monitor,
    output: OutputSelector = None,
    *,
    background: bool = True,
    monitor_training: bool = False,
    copy_inputs: bool = True,
    check_width: bool = True,
) -> MonitoredModel:
    """Return a module that behaves exactly like ``model`` and reports its outputs to ``monitor``.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``d one included).
        monitor: the Monitor to feed.
        output: how to find the logits in the model's return value (see :func:`select_output`).
        background: score on the Monitor's background thread (default; the forward only
            enqueues a copy) or synchronously inside forward.
        monitor_training: also monitor while the model is in training mode.
        copy_inputs: when the monitor has a label queue, copy the inputs so that a caller
            reusing its input buffer cannot change what is queued.
        check_width: when the model's output width can be read off its last Linear layer,
            refuse a detector calibrated for another width.

    Raises:
        ValueError: the model's known output width differs from the detector's.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}."
        )
    if not isinstance(monitor, Monitor):
        raise ValueError(
            f"Expected `monitor` to be an oodmon.Monitor, but got {type(monitor).__name__}."
        )
    if check_width and output is None:
        width = _known_output_width(model)
        expected = monitor.detector.num_outputs
        if width is not None and width != expected:
            raise ValueError(
                f"The model's last layer has {width} outputs but the detector expects "
                f"{expected}: calibrate the detector on this model's outputs (or pass "
                "check_width=False if the last Linear is not the output layer)."
            )
    return MonitoredModel(
        model,
        monitor,
        output,
        background=background,
        monitor_training=monitor_training,
        copy_inputs=copy_inputs,
    )
