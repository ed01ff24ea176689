"""The examples under ``examples/`` run and do what their docstrings promise."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quickstart = load_example("quickstart")
log_shipping = load_example("log_shipping")


def catch_loop_errors() -> list[dict[str, Any]]:
    """What reaches the running loop's exception handler ("never retrieved" & co)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


def run_script(name: str) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- quickstart ----------------------------------------------------------------------


async def test_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    results = await quickstart.main()
    assert results == [n * n for n in range(100)]
    out = capsys.readouterr().out
    # 100 items, max_size=32: three full batches and the rest after max_wait.
    assert out.count("sink called with 32 items") == 3
    assert out.count("sink called with 4 items") == 1
    assert "BatcherStats(submitted=100, succeeded=100, failed=0" in out
    assert "batches=4" in out


def test_quickstart_script() -> None:
    proc = run_script("quickstart")
    assert proc.returncode == 0, proc.stderr
    assert "[0, 1, 4, 9, 16] ... 9801" in proc.stdout
    assert proc.stderr == ""


# -- log shipping --------------------------------------------------------------------


async def test_log_shipping_ships_every_record(caplog: pytest.LogCaptureFixture) -> None:
    loop_errors = catch_loop_errors()
    report = await log_shipping.main(producers=3, records_per_producer=1_000, latency=0.005)
    assert report.produced == 3_000
    # Two oversized records per producer are refused (and logged), the rest shipped.
    assert report.refused == 6
    assert report.shipped == 3_000 - 6
    assert report.dropped == 0
    assert report.lost == 0
    assert report.batches < report.produced // 100
    refusals = [r for r in caplog.records if r.name == "log_shipping"]
    assert len(refusals) == 6
    assert all("too large" in r.getMessage() for r in refusals)
    gc.collect()  # a failed future nobody looked at would complain now
    assert loop_errors == []


@pytest.mark.looptime
async def test_log_shipping_bounded_buffer_drops_oldest(caplog: pytest.LogCaptureFixture) -> None:
    loop_errors = catch_loop_errors()
    caplog.set_level(logging.ERROR, logger="log_shipping")
    report = await log_shipping.main(producers=4, records_per_producer=1_000, max_pending=100)
    # The collector cannot keep up: the buffer stays bounded and the oldest
    # records are dropped, each one reported, none silently lost.
    assert report.peak_pending <= 100
    assert report.dropped > 0
    assert report.shipped > 0
    assert report.lost == 0
    assert report.shipped + report.refused + report.dropped == report.produced
    gc.collect()
    assert loop_errors == []


async def test_log_shipping_collector_keeps_every_record_once() -> None:
    collector = log_shipping.Collector(latency=0)
    verdicts = await collector.ship(
        [
            log_shipping.LogRecord("w", 0, "INFO", "ok"),
            log_shipping.LogRecord("w", 1, "INFO", "x" * (log_shipping.MAX_RECORD_BYTES + 1)),
        ]
    )
    assert verdicts[0] is None
    assert isinstance(verdicts[1], ValueError)
    assert [r.seq for r in collector.received] == [0]


def test_log_shipping_script() -> None:
    proc = run_script("log_shipping")
    assert proc.returncode == 0, proc.stderr
    assert "produced 4,000 records; shipped 3,992 in" in proc.stdout
    assert "lost 0" in proc.stdout
    assert proc.stderr.count(" not shipped: ") == 8
    assert "never retrieved" not in proc.stderr
