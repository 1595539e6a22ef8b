"""Each entry point imports only what it uses: the light ones never pay for torch (or NumPy).

Importing torch takes seconds, and ``torch._dynamo`` seconds more; a labeller runs the queue
commands one item at a time. Each case runs in a fresh interpreter and reads ``sys.modules``
after the command, so an import anywhere on its path shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oodmon.label_queue import LabelQueue

_PROBE = """
import contextlib, io, json, sys
argv = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        if argv == ["import"]:
            import oodmon
            code = 0
        else:
            from oodmon.cli.main import main
            code = main(argv)
    except SystemExit as exit:
        code = exit.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported_by(*argv: str) -> tuple[int, set[str]]:
    """The exit code of ``oodmon ARGV`` (or ``import oodmon``) and every module it imported."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(argv))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.fixture(scope="module")
def queue_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("queue") / "queue.db"
    with LabelQueue(path) as queue:
        for i in range(3):
            queue.put([float(i)], model="m", version="v1", p_value=0.01 * i, distance=1.0)
    return path


def _heavy(modules: set[str], numpy: bool = True) -> set[str]:
    """Torch's modules, and NumPy's root unless the command needs NumPy (about 0.15 s)."""
    heavy = {m for m in modules if m == "torch" or m.startswith("torch.")}
    return heavy | ({"numpy"} & modules if numpy else set())


@pytest.mark.parametrize(
    "argv",
    [
        ("import",),
        ("--version",),
        ("--help",),
        ("queue", "--help"),
        ("sidecar", "--help"),
        ("consume", "--help"),
        ("demo", "--help"),
    ],
)
def test_light_entry_points_do_not_import_torch_or_numpy(argv: tuple[str, ...]) -> None:
    code, modules = imported_by(*argv)
    assert code == 0
    assert not _heavy(modules), sorted(_heavy(modules))[:5]


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("queue", "--help")])
def test_version_and_help_do_not_import_the_label_queue(argv: tuple[str, ...]) -> None:
    # the queue modules (HTTP and XML clients among them) were a third of `--version`
    code, modules = imported_by(*argv)
    assert code == 0
    assert not {m for m in modules if m.startswith("oodmon.label_queue")}


@pytest.mark.parametrize(
    "command", [("stats",), ("stats", "--json"), ("ls",), ("export",), ("claim", "--worker", "w")]
)
def test_queue_commands_do_not_import_torch_or_numpy(
    queue_file: Path, command: tuple[str, ...]
) -> None:
    name, *rest = command
    code, modules = imported_by("queue", name, str(queue_file), *rest)
    assert code == 0
    heavy = _heavy(modules, numpy=name != "export")  # export encodes images with NumPy
    assert not heavy, sorted(heavy)[:5]


def test_a_model_command_imports_torch_but_not_dynamo(tmp_path: Path) -> None:
    # the probe above sees torch when a command needs it (this is what the light cases exclude)
    code, modules = imported_by("inspect", str(tmp_path / "missing.json"))
    assert code == 2  # no such detector file
    assert "torch" in modules and "oodmon.cli.model" in modules
    assert not {m for m in modules if m.startswith("torch._dynamo")}


def test_the_public_names_load_on_first_use() -> None:
    import oodmon

    for name in oodmon.__all__:
        assert getattr(oodmon, name) is not None, name
    assert set(oodmon.__all__) <= set(dir(oodmon))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        oodmon.Nope  # noqa: B018


def test_submodules_load_on_first_access() -> None:
    code = (
        "import sys, oodmon, oodmon.label_queue as q; "
        "assert 'oodmon.scores' not in sys.modules; "
        "print(oodmon.scores.use_compiled.__name__, oodmon.offline.__name__, "
        "q.writer.QueueWriter.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["use_compiled", "oodmon.offline", "QueueWriter"], out.stderr
    import oodmon

    for missing in ("Nope", "nope_module"):
        with pytest.raises(AttributeError, match=f"no attribute '{missing}'"):
            getattr(oodmon, missing)


def test_no_public_name_is_also_a_submodule_name() -> None:
    # importing a submodule binds it on the package, hiding a lazily loaded name of the same
    # spelling (`oodmon.wrap(model)` would call a module)
    import oodmon

    package = Path(oodmon.__file__).parent
    clashes = [
        n for n in oodmon.__all__ if (package / f"{n}.py").exists() or (package / n).is_dir()
    ]
    assert clashes == []
