"""wrap(): the wrapped model must be indistinguishable from the bare one, and never break."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from conftest import NUM_CLASSES
from torch import nn

from oodmon import Detector
from oodmon.monitor import Monitor
from oodmon.sinks import InMemoryMetrics, InMemoryQueue
from oodmon.wrapping import wrap


class SmallCNN(nn.Module):
    def __init__(self, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 12 * 12, classes)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(torch.max_pool2d(x, 2).flatten(1))


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(x)
        return {"features": x * 2, "logits": z}


class TupleModel(DictModel):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.body(x), x.sum(1)


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    scores: torch.Tensor


class DataclassModel(DictModel):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        return Output(hidden=x, scores=self.body(x))


def calibrated_monitor(model: nn.Module, make_input, detector_ocs, select=None, **kw):  # type: ignore[no-untyped-def]
    from oodmon.wrapping import select_output

    with torch.no_grad():
        cal = select_output(model(make_input(400)), select)
    detector = Detector(detector_ocs, alpha=0.1).fit(cal)
    return Monitor(detector, "model", "v1", InMemoryMetrics(), InMemoryQueue(), **kw)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))


def vectors(n: int) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(n))


CASES = [
    ("cnn", SmallCNN, images, None),
    ("dict", DictModel, vectors, None),
    ("tuple", TupleModel, vectors, None),
    ("dataclass", DataclassModel, vectors, "scores"),
]


@pytest.mark.parametrize(
    ("name", "make_model", "make_input", "select"), CASES, ids=[c[0] for c in CASES]
)
def test_outputs_are_the_very_objects_the_model_returned(
    name,
    make_model,
    make_input,
    select,
    ocs,  # type: ignore[no-untyped-def]
) -> None:
    torch.manual_seed(0)
    model = make_model().eval()
    monitor = calibrated_monitor(model, make_input, ocs, select, strict=True)
    wrapped = wrap(model, monitor, output=select)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(out))
    x = make_input(16)
    with torch.no_grad():
        bare = model(x)
        result = wrapped(x)
    assert result is seen[-1]  # not a copy: the object the model returned
    assert type(result) is type(bare)
    bare_t = torch.utils._pytree.tree_leaves(
        dataclasses.asdict(bare) if name == "dataclass" else bare
    )
    got_t = torch.utils._pytree.tree_leaves(
        dataclasses.asdict(result) if name == "dataclass" else result
    )
    assert all(torch.equal(a, b) for a, b in zip(bare_t, got_t, strict=True))
    assert monitor.stats().seen == 16 and monitor.stats().errors_total == 0


def test_state_dict_round_trips_both_ways(detector: Detector) -> None:
    torch.manual_seed(1)
    bare, other = SmallCNN(), SmallCNN()
    wrapped = wrap(other, Monitor(detector, "m", "1"))
    assert list(wrapped.state_dict()) == list(bare.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in bare.named_parameters()]
    wrapped.load_state_dict(bare.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.state_dict().values(), bare.state_dict().values(), strict=True)
    )
    fresh = SmallCNN()
    fresh.load_state_dict(wrapped.state_dict())
    assert torch.equal(fresh.fc.weight, bare.fc.weight)

    # nested in a larger module, keys are still those of the bare model under the parent
    parent_bare = nn.Sequential(nn.Identity(), SmallCNN())
    parent_wrapped = nn.Sequential(nn.Identity(), wrap(SmallCNN(), Monitor(detector, "m", "1")))
    assert list(parent_bare.state_dict()) == list(parent_wrapped.state_dict())
    parent_wrapped.load_state_dict(parent_bare.state_dict())


def test_attributes_devices_modes_and_hooks_pass_through(detector: Detector) -> None:
    model = SmallCNN()
    wrapped = wrap(model, Monitor(detector, "m", "1"))
    assert wrapped.classes == NUM_CLASSES and wrapped.fc is model.fc
    assert list(wrapped.parameters()) == list(model.parameters())
    wrapped.to(torch.float64)
    assert model.fc.weight.dtype == torch.float64 and model.calls.dtype == torch.long
    wrapped.float()
    wrapped.eval()
    assert not model.training and not model.bn.training
    wrapped.train()
    assert model.training and model.bn.training
    calls = []
    wrapped.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    wrapped.eval()
    with torch.no_grad():
        wrapped(images(3))
    assert calls == [torch.Size([3, NUM_CLASSES])]


def test_training_mode_is_not_monitored_unless_asked(
    detector: Detector, caplog: pytest.LogCaptureFixture
) -> None:
    model = SmallCNN().train()
    monitor = Monitor(detector, "m", "1")
    with caplog.at_level("WARNING", logger="oodmon"):
        wrap(model, monitor)(images(4))
        wrap(model, monitor)(images(4))
    assert monitor.stats().seen == 0
    assert [r.getMessage().count("training mode") for r in caplog.records] == [1]
    opted_in = Monitor(detector, "m", "1")
    out = wrap(model, opted_in, monitor_training=True)(images(4))
    out.sum().backward()  # the graph is intact for the caller
    assert model.fc.weight.grad is not None
    assert opted_in.stats().seen == 4


def test_monitoring_keeps_no_autograd_graph_alive(detector: Detector) -> None:
    model = SmallCNN().train()
    monitor = Monitor(detector, "m", "1")
    wrapped = wrap(model, monitor, monitor_training=True)
    saved: list[weakref.ref[torch.Tensor]] = []
    # the flattened activations fc saves for backward live exactly as long as the graph
    model.fc.register_forward_hook(lambda mod, args, out: saved.append(weakref.ref(args[0])))
    out = wrapped(images(4))
    assert out.grad_fn is not None and saved[0]() is not None
    monitor.flush()
    del out
    gc.collect()
    assert saved[0]() is None, "monitoring kept the autograd graph (and its activations) alive"


def test_mode_is_read_from_the_model_itself(detector: Detector) -> None:
    model = SmallCNN()  # a new module starts in training mode
    monitor = Monitor(detector, "m", "1")
    wrapped = wrap(model, monitor)
    model.eval()  # switched on the model, not on the wrapper
    with torch.no_grad():
        wrapped(images(3))
    assert monitor.stats().seen == 3


def test_copies_checkpoints_and_pickling(detector: Detector) -> None:
    import copy
    import pickle

    class WithExtraState(SmallCNN):
        def get_extra_state(self) -> dict[str, int]:
            return {"calls": int(self.classes)}

        def set_extra_state(self, state: dict[str, int]) -> None:
            self.classes = state["calls"]

    model = WithExtraState().eval()
    monitor = Monitor(detector, "m", "1")
    wrapped = wrap(model, monitor)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert "_extra_state" in wrapped.state_dict()
    state = model.state_dict()
    state["_extra_state"] = {"calls": 10}
    wrapped.load_state_dict(state)

    twin = copy.deepcopy(wrapped)  # e.g. an EMA copy of a served model
    assert twin.monitor is monitor and twin.model is not model
    assert torch.equal(twin.model.fc.weight, model.fc.weight)
    with torch.no_grad():
        twin(images(2))
    assert monitor.stats().seen == 2
    with pytest.raises(TypeError, match="save `wrapped.state_dict\\(\\)`"):
        pickle.dumps(wrapped)


@pytest.mark.parametrize("background", [True, False], ids=["background", "sync"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_inference_contexts(context: str, background: bool, ocs) -> None:  # type: ignore[no-untyped-def]
    model = SmallCNN().eval()
    monitor = calibrated_monitor(model, images, ocs, strict=True)
    wrapped = wrap(model, monitor, background=background)
    ctx = {
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
    }[context]
    with ctx, torch.no_grad():
        expected = model(images(8))
        got = wrapped(images(8))
    assert torch.equal(got, expected) and got.dtype == expected.dtype
    stats = monitor.stats()
    assert stats.seen == 8 and stats.errors_total == 0 and stats.invalid_total == 0


def test_compiled_models(ocs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = SmallCNN().eval()
    compiled = torch.compile(model)
    monitor = calibrated_monitor(model, images, ocs, strict=True)
    wrapped = wrap(compiled, monitor)
    assert list(wrapped.state_dict()) == list(compiled.state_dict())
    x = images(8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), compiled(x))
        # compiling the wrapper: monitoring is excluded from the graph and still runs
        outer = torch.compile(wrap(model, monitor))
        torch.testing.assert_close(outer(x), model(x))
    stats = monitor.stats()
    assert stats.seen == 16 and stats.errors_total == 0


def test_compiled_wrapper_reports_from_outside_the_graph(ocs) -> None:  # type: ignore[no-untyped-def]
    """The ``is_compiling()`` branch: dynamo traces the forward, the report runs eagerly."""
    model = SmallCNN().eval()
    monitor = calibrated_monitor(model, images, ocs, strict=True)
    seen_while_compiling: list[bool] = []
    report = monitor.submit

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen_while_compiling.append(torch.compiler.is_compiling())
        report(*args, **kwargs)

    monitor.submit = spy  # type: ignore[method-assign]
    outer = torch.compile(wrap(model, monitor), backend="eager")
    x = images(4)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(outer(x), model(x))
    assert seen_while_compiling == [False] * 3  # reported three times, never inside a graph
    assert monitor.stats().seen == 12


def test_importing_oodmon_leaves_torch_dynamo_unloaded() -> None:
    # torch._dynamo costs seconds to import; only torch.compile users should pay for it
    code = (
        "import sys, oodmon; oodmon.wrap, oodmon.Monitor, oodmon.Detector; "
        "assert 'oodmon.wrapping' in sys.modules; "
        "print(sorted(m for m in sys.modules if 'torch._dynamo' in m))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"


def test_eight_threads_add_up_exactly(ocs) -> None:  # type: ignore[no-untyped-def]
    model = SmallCNN().eval()
    metrics, queue = InMemoryMetrics(), InMemoryQueue(capacity=10**6)
    probe = calibrated_monitor(model, images, ocs)
    monitor = Monitor(probe.detector, "m", "1", metrics, queue)
    wrapped = wrap(model, monitor)
    batches = {t: [images(1 + (t * 7 + i) % 5) * (1 + t) for i in range(25)] for t in range(8)}
    errors: list[BaseException] = []

    def hammer(t: int) -> None:
        try:
            with torch.no_grad():
                for x in batches[t]:
                    wrapped(x)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with torch.no_grad():
        all_x = [x for t in range(8) for x in batches[t]]
        expected_flags = sum(int(probe.detector.predict(model(x)).flag.sum()) for x in all_x)
    rows = sum(len(x) for x in all_x)
    stats = monitor.stats()
    assert stats.seen == rows == metrics.seen
    assert stats.flagged == expected_flags == queue.rows == metrics.flagged
    assert stats.errors_total == 0


class Explode(RuntimeError):
    pass


def test_injected_monitor_failure_leaves_output_unchanged(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = SmallCNN().eval()
    for background in (True, False):
        monitor = Monitor(detector, "m", "1")

        def explode(*args: object, **kwargs: object) -> None:
            raise Explode("monitor bug")

        monkeypatch.setattr(monitor.detector, "predict", explode)
        wrapped = wrap(model, monitor, background=background)
        with torch.no_grad():
            assert torch.equal(wrapped(images(5)), model(images(5)))
        assert monitor.stats().errors == {"Explode": 1}
        monkeypatch.undo()
    broken_selector = Monitor(detector, "m", "1")
    with torch.no_grad():
        out = wrap(model, broken_selector, output="nope")(images(2))
    assert torch.equal(out, model(images(2)))
    assert broken_selector.stats().errors_total == 1


def test_nan_and_wrong_width_outputs(detector: Detector) -> None:
    class NaNModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), NUM_CLASSES)
            out[0] = float("nan")
            return out

    monitor = Monitor(detector, "m", "1")
    wrap(NaNModel().eval(), monitor)(images(3))
    assert monitor.stats().invalid == {"nonfinite": 1}

    with pytest.raises(ValueError, match="last layer has 7 outputs but the detector expects 10"):
        wrap(SmallCNN(classes=7), Monitor(detector, "m", "1"))

    class Hidden(nn.Module):  # width unknowable until the first batch
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :7]

    late = Monitor(detector, "m", "1")
    with torch.no_grad():
        out = wrap(Hidden().eval(), late)(images(4))
    assert out.shape == (4, 7)
    assert late.stats().invalid == {"wrong_width": 4}


class Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise RuntimeError("__str__ itself fails")


@pytest.mark.parametrize("background", [False, True])
def test_hostile_outputs_come_back_unchanged(detector: Detector, background: bool) -> None:
    hostile = [
        torch.ones(2, NUM_CLASSES, dtype=torch.bool),
        torch.zeros(2, NUM_CLASSES, dtype=torch.complex64),
        torch.zeros(2, NUM_CLASSES, device="meta"),
        torch.zeros(2, NUM_CLASSES).to_sparse(),
        torch.nested.nested_tensor([torch.zeros(NUM_CLASSES), torch.zeros(3)], layout=torch.jagged),
    ]

    class Hostile(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out

    monitor = Monitor(detector, "m", "1", linger=0)
    for out in hostile:
        assert wrap(Hostile(out).eval(), monitor, background=background)(images(2)) is out
    stats = monitor.stats()
    assert stats.errors == {}
    assert stats.invalid == {"wrong_dtype": 4, "wrong_layout": 6}
    assert stats.seen == 10

    def unprintable(result: object) -> torch.Tensor:
        raise Unprintable()

    quiet = Monitor(detector, "m", "1")
    model = SmallCNN().eval()
    with torch.no_grad():
        out = wrap(model, quiet, output=unprintable, background=background)(images(2))
        assert torch.equal(out, model(images(2)))
    assert quiet.stats().errors == {"Unprintable": 1}
