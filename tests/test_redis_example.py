"""examples/stream_pipeline.py runs end to end against a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .redis_server import RedisServer
from .test_examples import load_example

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(60)]

stream_pipeline = load_example("stream_pipeline")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


async def test_demo_aggregates_idempotently_and_reports_dead_letters(
    server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--redis-url", server.url, "--db", str(tmp_path / "t.sqlite3")]
    rep = await stream_pipeline.main([*argv, "--count", "1000", "--min-idle", "1.0"])
    assert rep is not None
    assert rep.applied == 1000 - 10  # every 97th order is malformed
    assert len(rep.dead) == 10
    assert {d["error_type"] for d in rep.dead} == {"ValueError"}
    assert all(d["deliveries"] == "3" and d["amount"] == "n/a" for d in rep.dead)
    assert rep.pending == 0
    out = capsys.readouterr().out
    assert "totals check:" in out
    # Applying the same entries again changes nothing (the sink is idempotent).
    db = tmp_path / "t.sqlite3"
    before = stream_pipeline.report
    again = stream_pipeline.apply(db, [("0-1", "acme", 100)])
    assert again == 1
    assert stream_pipeline.apply(db, [("0-1", "acme", 100)]) == 0
    assert before is stream_pipeline.report
    # The report role reads the same state.
    rep2 = await stream_pipeline.main(["report", *argv])
    assert rep2 is not None
    assert rep2.applied == rep.applied + 1


def test_one_command(server: RedisServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            *(sys.executable, "examples/stream_pipeline.py", "--db", str(tmp_path / "x.sqlite3")),
            *("--count", "500", "--min-idle", "1.0"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "produced 500 orders (5 malformed); 3 consumers" in proc.stdout
    assert "dead letters (orders:dead): 5" in proc.stdout
    assert "totals check:" in proc.stdout
