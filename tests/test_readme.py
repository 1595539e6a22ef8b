"""The README must stay true: its example runs, its metrics table is current, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from oodmon.metrics import metrics_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_metrics_table_is_current() -> None:
    block = re.search(r"<!-- metrics-table:[^>]*-->\n(.*?)<!-- /metrics-table -->", README, re.S)
    assert block is not None
    assert block.group(1) == metrics_table()


def test_the_two_fresh_machine_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, re.S)
    demo = (
        'python3 -m venv .venv && .venv/bin/pip install -e ".[experiments]" '
        "&& .venv/bin/oodmon demo"
    )
    assert commands == [demo, "bash .ci/run"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pytest" in ci and '"$status" -eq 5' in ci


def test_wrapping_example_runs(tmp_path: Path) -> None:
    section = README.split("## Wrapping a model", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert code is not None
    source = code.group(1)
    imports = [line for line in source.splitlines() if re.match(r"(from|import) ", line)]
    assert imports == ["import oodmon"], "the example must need `import oodmon` alone"
    source = source.replace("port=9464", "port=0").replace(
        '"flagged.sqlite"', repr(str(tmp_path / "flagged.sqlite"))
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    namespace = {
        "train_labels": torch.randint(0, 10, (500,)),
        "model": model,
        "held_out_inputs": torch.randn(300, 4, 4),
        "batch": torch.randn(32, 4, 4),
    }
    with torch.no_grad():
        exec(compile(source, "README.md", "exec"), namespace)
    try:
        assert torch.equal(namespace["logits"], model(namespace["batch"]))
        monitor = namespace["monitor"]
        assert monitor.stats().seen == 32 and monitor.stats().errors_total == 0
    finally:
        namespace["server"].close()
        namespace["monitor"].close()
        for name in set(REGISTRY._names_to_collectors) - before:  # leave the default registry clean
            collector = REGISTRY._names_to_collectors.get(name)
            if collector is not None:
                REGISTRY.unregister(collector)


def test_changelog_lists_every_metric_name() -> None:
    from oodmon.metrics import METRIC_NAMES

    changelog = (ROOT / "CHANGELOG.md").read_text()
    unreleased = changelog.split("## Unreleased", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in METRIC_NAMES if f"`{name}`" not in unreleased]
    assert not missing, f"CHANGELOG.md's Unreleased section does not list {missing}"


def test_every_command_block_runs_as_written_in_a_fresh_clone() -> None:
    """After the quick start, `oodmon` and `pip` live in .venv/bin, not on PATH."""
    blocks = re.findall(r"```(?:bash|text|sh)\n(.*?)\n```", README, re.S)
    checked = 0
    for block in blocks:
        activated = False
        for line in block.splitlines():
            command = line.strip()
            if command.startswith("source .venv/bin/activate"):
                activated = True
            for word in re.findall(r"(?:^|&& |\| )(oodmon|pip|python) ", command):
                checked += 1
                assert activated, f"`{word}` is not on PATH after the quick start: {command!r}"
    assert checked >= 6  # the command-line section was found


def test_cpu_torch_is_explained_without_changing_the_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick_start
    assert "source .venv/bin/activate" in quick_start
    assert "127.0.0.1:9465" in README  # the demo's port
