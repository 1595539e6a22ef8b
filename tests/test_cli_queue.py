"""``oodmon queue ...`` in-process through ``oodmon.cli.main``, against a real SQLite file and a
real PostgreSQL server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import postgres_server
import pytest

from oodmon.cli import main  # the real entry point: dispatch, one-line errors, exit codes
from oodmon.cli import queue as queue_commands
from oodmon.label_queue import LabelQueue


@pytest.fixture
def url(queue_url: str) -> str:
    """A queue on each backend holding three items."""
    url = queue_url
    with LabelQueue(url) as q:
        for i, p in enumerate([0.03, 0.001, 0.2]):
            image = np.full((4, 4), i * 40, dtype=np.uint8)
            q.put(
                image,
                model="mnist",
                version="v1",
                p_value=p,
                distance=0.1 * (i + 1),
                predicted=i,
                id=f"item-{i}",
            )
        q.put(
            reference="s3://bucket/cat.png",
            model="mnist",
            version="v1",
            p_value=0.5,
            distance=1.0,
            id="item-ref",
        )
    return url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["queue", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_prints_a_table_most_ood_first(url, capsys):
    code, out, err = run(capsys, "ls", url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "P_VALUE", "DISTANCE"]
    assert [line.split()[0] for line in lines[1:5]] == ["item-1", "item-0", "item-2", "item-ref"]
    assert "s3://bucket/cat.png" in out and "npy 144 B" in out and "mnist@v1" in out
    assert lines[-1] == "4 of 4 items (4 queued, 0 claimed, 0 done)"
    code, out, _ = run(capsys, "ls", url, "--limit", "1", "--status", "queued")
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["item-1"]


def test_stats(url, capsys):
    code, out, _ = run(capsys, "stats", url, "--json")
    stats = json.loads(out)
    assert code == 0
    assert (stats["queued"], stats["total"], stats["evicted"], stats["schema_version"]) == (
        4,
        4,
        0,
        1,
    )
    code, out, _ = run(capsys, "stats", url)
    assert code == 0 and any(line.split() == ["queued", "4"] for line in out.splitlines())


def test_claim_done_release_flow(url, capsys, tmp_path):
    tasks = tmp_path / "mine.json"
    code, out, _ = run(
        capsys, "claim", url, "--worker", "ann", "-n", "2", "--lease", "600", "-o", str(tasks)
    )
    assert code == 0 and "claimed 2 items for ann until" in out
    assert [t["data"]["oodmon_id"] for t in json.loads(tasks.read_text())] == ["item-1", "item-0"]
    code, out, err = run(capsys, "done", url, "item-1", "cat", "--worker", "bob")
    assert code == 2 and "claimed by 'ann'" in err and "Traceback" not in err
    code, out, _ = run(capsys, "done", url, "item-1", "cat", "--worker", "ann")
    assert code == 0 and out.strip() == "item-1: labelled 'cat'"
    code, out, _ = run(capsys, "release", url, "item-0", "--worker", "ann")
    assert code == 0 and out.strip() == "item-0: released"
    code, out, _ = run(capsys, "stats", url, "--json")
    assert json.loads(out)["done"] == 1 and json.loads(out)["queued"] == 3
    code, _, err = run(capsys, "done", url, "no-such-item", "cat")
    assert code == 2 and err.startswith("oodmon: error: ") and "no-such-item" in err


def test_export_label_studio_and_jsonl(url, capsys, tmp_path):
    out_file = tmp_path / "tasks.json"
    code, _, err = run(
        capsys,
        "export",
        url,
        "-o",
        str(out_file),
        "--class-names",
        ",".join(f"d{k}" for k in range(10)),
    )
    assert code == 0 and "wrote 4 items" in err
    tasks = json.loads(out_file.read_text())
    assert [t["data"]["oodmon_id"] for t in tasks] == ["item-1", "item-0", "item-2", "item-ref"]
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["d1"]
    assert tasks[3]["data"]["image"] == "s3://bucket/cat.png"
    code, out, _ = run(capsys, "export", url, "--format", "jsonl", "--limit", "2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows] == ["item-1", "item-0"]


def test_read_only_commands_leave_the_file_untouched(tmp_path, capsys):
    path = tmp_path / "q.db"
    with LabelQueue(path) as q:
        q.put(np.zeros((4, 4)), model="m", version="1", p_value=0.01, distance=0.1)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    for argv in (
        ["ls", str(path)],
        ["stats", str(path)],
        ["export", str(path), "-o", str(tmp_path / "x.json")],
    ):
        assert run(capsys, *argv)[0] == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_clean_errors(tmp_path, capsys):
    code, _, err = run(capsys, "ls", str(tmp_path / "missing.db"))
    assert (
        code == 2
        and err
        == f"oodmon: error: No label queue at {tmp_path / 'missing.db'}: the file does not exist.\n"
    )
    assert not (tmp_path / "missing.db").exists()
    code, _, err = run(capsys, "stats", "mysql://root:hunter2@db/q")
    assert code == 2 and "Unsupported" in err and "hunter2" not in err
    junk = tmp_path / "junk.db"
    junk.write_text("hello" * 200)
    code, _, err = run(capsys, "ls", str(junk))
    assert code == 2 and "not" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = run(capsys, "claim", str(empty), "--worker", "ann")
    assert code == 2 and "not an oodmon label queue" in err
    code, _, err = run(capsys, "ls", str(empty))  # read-only: the advice is not API-speak
    assert code == 2 and "not an oodmon label queue" in err and "read_only" not in err
    code, _, err = run(capsys, "export", str(junk), "-o", str(tmp_path / "no-dir" / "x.json"))
    assert code == 2


def test_unreachable_server_is_a_runtime_error_without_the_password(capsys):
    pytest.importorskip("psycopg")
    port = postgres_server.free_port()
    url = f"postgresql://alice:Topsecret9@127.0.0.1:{port}/q?connect_timeout=2"
    code, out, err = run(capsys, "stats", url)
    assert code == 1 and out == ""
    assert err.startswith(
        "oodmon: error: Cannot connect to the label queue postgresql://alice:***@"
    )
    assert "Topsecret9" not in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["queue", "claim", "q.db"])  # --worker is required
    assert info.value.code == 2
    assert "--worker" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["queue", "--help"])
    out = capsys.readouterr().out
    for command in ("ls", "stats", "export", "claim", "done", "release"):
        assert command in out
    assert Path(queue_commands.__file__).parts[-2:] == ("cli", "queue.py")


# ---------------------------------------------------------------------- hostile strings, bad input


EVIL = "evil\x1b[2J\x1b]0;owned\x07\nforged-row  queued\u202e"


def test_ids_labels_and_workers_are_printed_escaped(queue_url, capsys):
    with LabelQueue(queue_url) as q:
        q.put(reference=f"s3://{EVIL}", model="mnist", version="v1", p_value=0.01,
              distance=0.1, id=EVIL)  # fmt: skip
    for argv in (
        ("ls", queue_url),
        ("claim", queue_url, "--worker", EVIL, "-n", "1"),
        ("ls", queue_url),
        ("done", queue_url, EVIL, EVIL),
        ("ls", queue_url, "--status", "done"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert not any(c in out for c in "\x1b\x07\u202e"), (argv, out)
        assert "evil\\x1b[2J" in out
        assert not any(line.startswith("forged-row") for line in out.splitlines())
    assert len(out.splitlines()) == 3  # header, one item, summary: no forged row


def test_a_locked_database_is_busy_not_broken(tmp_path, capsys):
    import sqlite3

    path = tmp_path / "q.db"
    LabelQueue(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO meta (key, value) VALUES ('lock', 'held')")
    try:
        for argv in (("ls", str(path)), ("claim", str(path), "--worker", "ann")):
            code, _, err = run(capsys, *argv, "--timeout", "0.1")
            assert code == 1, err  # a runtime condition, worth retrying: not bad input (2)
            assert "locked by another process (busy); try again" in err
            assert "not a usable SQLite database" not in err and len(err.splitlines()) == 1
    finally:
        holder.close()


READ_ONLY_SCRIPT = """
import os, sys
from oodmon.cli import main
from oodmon.cli.main import build_parser
import oodmon.label_queue.export, json  # imported before dropping privileges
build_parser()  # and what the parser imports lazily: nobody cannot read root's interpreter
if os.getuid() == 0:
    os.setuid(65534)  # root ignores directory permissions: read as nobody
for command in ("ls", "stats", "export"):
    code = main(["queue", command, sys.argv[1]])
    print(f"{command}={code}", file=sys.stderr)
"""


def test_a_queue_in_a_read_only_directory_can_be_read(capsys):
    import shutil
    import subprocess
    import sys
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="oodmon-ro-", dir="/tmp"))
    try:
        top.chmod(0o755)
        directory = top / "ro"
        directory.mkdir()
        path = directory / "q.db"
        with LabelQueue(path) as q:  # a writer leaves WAL mode: readers need the -shm file
            q.put(reference="s3://a.png", model="m", version="1", p_value=0.01, distance=0.1)
        assert sorted(p.name for p in directory.iterdir()) == ["q.db"]
        path.chmod(0o644)
        directory.chmod(0o555)
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_SCRIPT, str(path)],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
        )  # fmt: skip
        assert "ls=0" in done.stderr and "stats=0" in done.stderr, done.stderr
        assert "export=0" in done.stderr and "s3://a.png" in done.stdout, done.stderr
        assert sorted(p.name for p in directory.iterdir()) == ["q.db"]
    finally:
        (top / "ro").chmod(0o755)
        shutil.rmtree(top)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--lease", "1e308"), "Expected `lease_seconds` in (0, 31536000]"),
        (("--lease", "inf"), "Expected `lease_seconds`"),
        (("--lease", "nan"), "Expected `lease_seconds`"),
        (("-n", str(10**20)), "Expected `n` to be an integer in [1, 100000]"),
    ],
)
def test_claim_validates_before_it_changes_anything(tmp_path, capsys, argv, message):
    path = str(tmp_path / "q.db")
    with LabelQueue(path) as q:
        q.put(reference="s3://a.png", model="m", version="1", p_value=0.01, distance=0.1)
    code, out, err = run(capsys, "claim", path, "--worker", "ann", *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"oodmon: error: {message}") and len(err.splitlines()) == 1
    with LabelQueue(path, read_only=True) as q:
        assert q.stats().claimed == 0 and q.stats().queued == 1


def test_done_refuses_to_replace_a_label_without_force(tmp_path, capsys):
    path = str(tmp_path / "q.db")
    with LabelQueue(path) as q:
        q.put(reference="s3://a.png", model="m", version="1", p_value=0.01, distance=0.1, id="a")
    assert run(capsys, "done", path, "a", "cat")[0] == 0
    code, _, err = run(capsys, "done", path, "a", "dog")
    assert code == 2 and "already labelled 'cat'" in err and "--force" in err
    with LabelQueue(path, read_only=True) as q:
        assert q.get("a").label == "cat"
    code, out, _ = run(capsys, "done", path, "a", "dog", "--force")
    assert code == 0 and out == "a: labelled 'dog'\n"
    with LabelQueue(path, read_only=True) as q:
        assert q.get("a").label == "dog"
