"""The ``asyncbatch demo`` command: it runs, it compares, it draws.

Full runs use tiny loads. The live view is checked on virtual time (looptime),
where its refresh ticks land at exact points and a phase's duration costs no
wall-clock time.
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import asyncbatch
from asyncbatch import _demo
from asyncbatch.__main__ import main
from asyncbatch._demo import DemoConfig, run_demo

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "--requests",
    "300",
    "--concurrency",
    "50",
    "--sink-latency",
    "0.002",
    "--per-item-cost",
    "1e-6",
    "--max-wait",
    "0.001",
    "--max-size",
    "32",
]

ROWS = (
    "requests served",
    "backend calls",
    "calls saved",
    "items per call",
    "throughput",
    "p50 latency",
    "p99 latency",
)


class FakeTTY(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def row(output: str, label: str) -> tuple[str, str]:
    """The batched and unbatched cells of one comparison row."""
    match = re.search(rf"^  {re.escape(label)}\s+(.+?)\s{{3,}}(.+?)\s*$", output, re.MULTILINE)
    assert match is not None, f"no {label!r} row in:\n{output}"
    return match.group(1), match.group(2)


def number(cell: str) -> int:
    return int(cell.split()[0].replace(",", ""))


def test_demo_compares_batched_with_unbatched(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY, "--no-live"]) == 0
    out = capsys.readouterr().out
    for label in ROWS:
        row(out, label)
    assert "\x1b[" not in out
    assert [number(c) for c in row(out, "requests served")] == [300, 300]
    assert [number(c) for c in row(out, "answers correct")] == [300, 300]
    batched_calls, unbatched_calls = (number(c) for c in row(out, "backend calls"))
    assert unbatched_calls == 300
    assert batched_calls < unbatched_calls
    assert number(row(out, "calls saved")[0]) == 300 - batched_calls
    assert "x the throughput" in out


def test_demo_main_without_the_command_word(capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo.main([*TINY, "--requests", "40", "--no-live", "--loop", "asyncio"]) == 0
    assert "requests served" in capsys.readouterr().out


def test_demo_on_uvloop(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("uvloop")
    assert main(["demo", *TINY, "--requests", "100", "--no-live", "--loop", "uvloop"]) == 0
    assert number(row(capsys.readouterr().out, "requests served")[0]) == 100


def test_demo_without_uvloop_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert main(["demo", *TINY, "--no-live", "--loop", "uvloop"]) == 2
    captured = capsys.readouterr()
    assert "uvloop, which is not installed" in captured.err
    assert "--loop asyncio" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size", "0"], "must be >= 1, got 0"),
        (["--requests", "many"], "expected a number, got 'many'"),
        (["--sink-latency", "-1"], "must be >= 0, got -1"),
        (["--duration", "0"], "must be > 0, got 0"),
        (["--max-wait", "nan"], "must be >= 0, got nan"),
        (["--max-wait", "inf"], "must be finite, got inf"),
        (["--sink-latency", "1ms"], "expected a number, got '1ms'"),
        (["--loop", "trio"], "invalid choice"),
    ],
)
def test_demo_rejects_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["demo", *args])
    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: asyncbatch [-h] [--version] {demo} ...\n")
    assert "demo      simulate a slow backend" in captured.out
    assert "Durations are in seconds everywhere." in captured.out
    assert captured.err == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out == f"asyncbatch {asyncbatch.__version__}\n"


def test_every_duration_option_is_in_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--max-wait", "0.002", "--sink-latency", "0.05", "--per-item-cost", "20e-6"]
    config = _demo._config(_demo.build_parser().parse_args(args))
    assert (config.max_wait, config.sink_latency, config.per_item_cost) == (0.002, 0.05, 20e-6)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option in ("--duration", "--sink-latency", "--per-item-cost", "--max-wait"):
        assert f"{option} SECONDS" in help_text
    assert "in ms" not in help_text
    assert "Batcher max_wait, in seconds like every duration of the API" in help_text
    assert "(default: 0.005 = 5 ms)" in help_text


def test_config_needs_a_budget() -> None:
    with pytest.raises(ValueError, match="requests or a duration"):
        DemoConfig(requests=None, duration=None)


def test_command_line_defaults_match_the_config_defaults() -> None:
    config = _demo._config(_demo.build_parser().parse_args([]))
    assert config == DemoConfig()
    assert config.duration == _demo.DEFAULT_DURATION
    assert config.requests is None
    only_requests = _demo._config(_demo.build_parser().parse_args(["-n", "10"]))
    assert only_requests.duration is None


def test_python_dash_m_asyncbatch_demo() -> None:
    # Not a terminal: the live view degrades to plain lines.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "asyncbatch", "demo", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "\x1b[" not in proc.stdout
    assert re.search(r"^\s*batched\s+[\d.]+s .* req .* calls", proc.stdout, re.MULTILINE)
    assert re.search(r"^\s*unbatched\s+[\d.]+s .* req .* calls", proc.stdout, re.MULTILINE)
    batched_calls, unbatched_calls = (number(c) for c in row(proc.stdout, "backend calls"))
    assert batched_calls < unbatched_calls == 300


SMALL = DemoConfig(
    duration=2.2,  # refresh ticks never coincide with the deadline
    concurrency=40,
    sink_latency=0.010,
    per_item_cost=50e-6,
    max_size=16,
    max_wait=0.002,
    max_concurrency=2,
)


@pytest.mark.looptime
async def test_live_block_is_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out = FakeTTY()
    result = await run_demo(SMALL, out)
    text = out.getvalue()
    # 2.2 s phases, a draw every 0.5 s and a closing one: 4 in-place redraws each.
    assert text.count("\x1b[J") == 2 * 4
    assert "batch sizes so far" in text
    assert re.search(r"^\s+16 █+ [\d,]+$", text, re.MULTILINE)  # the histogram's full bucket
    assert "calls waiting for a connection" in text
    assert "dispatched on:" in text
    b, u = result.batched, result.unbatched
    assert b.requests == b.correct > 0
    assert u.requests == u.correct > 0
    assert b.items_per_call > 8
    assert b.max_batch == 16
    assert u.items_per_call == 1.0
    assert b.throughput > 4 * u.throughput
    assert b.p99 < u.p50
    assert sum(b.reasons.values()) == b.calls


@pytest.mark.looptime
async def test_live_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    await run_demo(SMALL, out)
    lines = [line for line in out.getvalue().splitlines() if re.match(r"^\s*\w*batched +\d", line)]
    # One line per second, then the phase's summing-up line.
    assert [line.split()[:2] for line in lines] == [
        ["batched", "1.0s"],
        ["batched", "2.0s"],
        ["batched", "2.2s"],
        ["unbatched", "1.0s"],
        ["unbatched", "2.0s"],
        ["unbatched", "2.2s"],
    ]


@pytest.mark.looptime
async def test_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    out = FakeTTY()
    await run_demo(DemoConfig(requests=50, concurrency=10, sink_latency=0.01), out)
    assert "\x1b[" not in out.getvalue()


@pytest.mark.looptime
async def test_instant_backend_has_no_rates() -> None:
    # With a zero-cost backend no virtual time passes: rates are undefined, not a crash.
    config = DemoConfig(requests=20, concurrency=5, sink_latency=0, per_item_cost=0, max_wait=0)
    out = io.StringIO()
    result = await run_demo(config, out)
    assert result.batched.elapsed == result.unbatched.elapsed == 0
    assert math.isinf(result.batched.throughput)
    assert row(out.getvalue(), "throughput") == ("-", "-")
    assert "batching: - the throughput" in out.getvalue()


async def test_a_real_clock_run_with_cancellation_at_the_deadline() -> None:
    # Duration only: the deadline cancels clients mid-request; every counted answer is right.
    config = DemoConfig(
        duration=0.2, concurrency=20, sink_latency=0.005, max_size=8, max_concurrency=2, live=False
    )
    result = await run_demo(config, io.StringIO())
    for phase in (result.batched, result.unbatched):
        assert phase.requests == phase.correct > 0
        assert phase.elapsed == pytest.approx(0.2, abs=0.15)
    assert result.batched.calls < result.batched.requests


def test_formatting_helpers() -> None:
    assert _demo._fmt_time(math.nan) == "-"
    assert _demo._fmt_time(20e-6) == "20 µs"
    assert _demo._fmt_time(0.0215) == "21.5 ms"
    assert _demo._fmt_time(2.5) == "2.50 s"
    assert _demo._fmt_reasons({}) == "-"
    empty = _demo._WindowStats(0, 0, 0, 0, 0, 0, math.nan, math.nan)
    assert _demo._fmt_sizes(empty) == "-"
    assert _demo._fmt_reasons({"wait": 1, "size": 3, "close": 0}) == "size 75%, wait 25%"
    assert _demo._percentile([], 0.5) != _demo._percentile([], 0.5)  # nan
    assert _demo._percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert _demo._percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert _demo._buckets(5) == [(1, 1), (2, 3), (4, 5)]
    assert _demo._histogram([], 8, width=4, bar="#") == []
    assert _demo._histogram([3, 3, 8], 8, width=4, bar="#") == [
        "      2-3 #### 2",
        "      4-7      0",
        "        8 ##   1",
    ]
    assert _demo._ratio(10, 0) == "-"
    assert _demo._ratio(10, 4) == "2.5x"
