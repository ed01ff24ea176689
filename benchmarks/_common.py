"""Shared helpers for the asyncbatch benchmarks.

The machines these run on are shared and noisy, so every benchmark here follows
the same discipline, and this module gives the pieces for it:

- compare systems *in the same process and the same run*, interleaved
  (A, B, B, A, A, B, ...) so that drift in the machine's load hits both alike
  (:func:`interleaved`);
- repeat, and report medians and the ratio of medians, never one absolute time
  (:class:`Summary`, :func:`ratio`);
- pin the things that move numbers: the event loop flavour (:func:`new_loop`)
  and the garbage collector (:func:`gc_state`), and say which ones were used
  (:func:`environment`);
- print a markdown table (:func:`markdown_table`) and optionally dump the raw
  samples as JSON (:func:`write_json`).

Benchmarks import this as ``_common`` (they are scripts, run from the checkout:
``python benchmarks/overhead.py``); :func:`use_checkout` makes ``import
asyncbatch`` pick up the working tree rather than an installed copy.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeAlias, TypeVar

__all__ = [
    "CLOCKS",
    "LOOPS",
    "REPO_ROOT",
    "Clock",
    "Elapsed",
    "LoopName",
    "Samples",
    "Stopwatch",
    "Summary",
    "available_loops",
    "environment",
    "gc_state",
    "interleaved",
    "loop_version",
    "markdown_table",
    "new_loop",
    "now",
    "ratio",
    "use_checkout",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

LoopName: TypeAlias = Literal["asyncio", "uvloop"]
LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")

S = TypeVar("S", bound=str)
V = TypeVar("V")


def use_checkout() -> None:
    """Put the repository root first on ``sys.path``.

    A benchmark measures the code next to it: run as ``python
    benchmarks/x.py``, ``sys.path[0]`` is ``benchmarks/`` and the package
    would otherwise come from wherever it happens to be installed (or not at
    all).
    """
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# -- event loops ---------------------------------------------------------------


def available_loops() -> tuple[LoopName, ...]:
    """The loop flavours importable here (``asyncio`` always, ``uvloop`` if installed)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ("asyncio",)
    return LOOPS


def new_loop(name: LoopName) -> asyncio.AbstractEventLoop:
    """A fresh event loop of the given flavour (the caller closes it)."""
    if name == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def loop_version(name: LoopName) -> str:
    """``asyncio`` reports the Python version; ``uvloop`` its own."""
    if name == "uvloop":
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return f"asyncio (Python {platform.python_version()})"


# -- garbage collector ---------------------------------------------------------


@contextmanager
def gc_state(enabled: bool) -> Iterator[None]:
    """Run the block with the cyclic GC on or off, starting from a clean heap.

    A full collection first, so one run does not pay for the previous run's
    garbage; the previous on/off state is restored on exit. With ``enabled``
    the thresholds are left at their defaults: GC pauses are part of what a
    user of the library pays, and counting them is the point of "GC on".
    """
    was_enabled = gc.isenabled()
    gc.collect()
    if enabled:
        gc.enable()
    else:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


# -- statistics ----------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated samples of one quantity."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    @property
    def spread(self) -> float:
        """(high - low) / median: how much to trust the median's last digits."""
        if self.n == 0 or self.median == 0:
            return float("nan")
        return (self.high - self.low) / self.median


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN instead of a ZeroDivisionError."""
    if denominator == 0 or denominator != denominator:
        return float("nan")
    return numerator / denominator


# -- running -------------------------------------------------------------------


@dataclass
class Samples(Generic[S, V]):
    """What :func:`interleaved` collected: the valid results of each timed round."""

    #: One dict per timed round: system -> its result, for the runs that were valid.
    rounds: list[dict[S, V]] = field(default_factory=list)
    #: system -> why each of its invalid runs was left out.
    failures: dict[S, list[str]] = field(default_factory=dict)

    def of(self, system: S) -> list[V]:
        """The valid results of ``system``, in the order they were taken."""
        return [r[system] for r in self.rounds if system in r]

    def pairs(self, a: S, b: S) -> list[tuple[V, V]]:
        """``(a, b)`` results of the rounds where both were valid.

        The two runs of a pair were taken back to back, so a ratio of them
        sees the same machine state on both sides.
        """
        return [(r[a], r[b]) for r in self.rounds if a in r and b in r]


def interleaved(
    systems: Sequence[S],
    repeat: int,
    run: Callable[[S], V | None],
    *,
    warmup: int = 1,
    on_failure: Callable[[S, str], None] | None = None,
) -> Samples[S, V]:
    """Run ``run(system)`` ``repeat`` times per system, interleaved.

    The order alternates between rounds (A B, B A, A B, ...) so that neither
    system always runs right after the other's garbage or always first on a
    warm cache. ``warmup`` untimed rounds come first. ``run`` returns the
    measurement, or ``None`` if the run was invalid (it is then left out and
    its reason recorded under ``failures``); an exception it raises is
    recorded the same way.
    """
    samples: Samples[S, V] = Samples([], {s: [] for s in systems})
    order = list(systems)
    for round_no in range(warmup + repeat):
        results: dict[S, V] = {}
        for system in order:
            try:
                value = run(system)
                reason = "invalid result"
            except Exception as exc:
                value = None
                reason = f"{type(exc).__name__}: {exc}"
            if round_no < warmup:
                continue
            if value is None:
                samples.failures[system].append(reason)
                if on_failure is not None:
                    on_failure(system, reason)
            else:
                results[system] = value
        if round_no >= warmup:
            samples.rounds.append(results)
        order.reverse()
    return samples


def now() -> float:
    """Wall-clock seconds (``time.perf_counter``), for progress messages."""
    return time.perf_counter()


Clock: TypeAlias = Literal["cpu", "wall"]
CLOCKS: tuple[Clock, ...] = ("cpu", "wall")


@dataclass(frozen=True)
class Elapsed:
    """One interval on both clocks.

    ``cpu`` is this process's CPU time (``time.process_time``: user + system,
    every thread). On a shared machine it leaves out the time other processes
    held the CPU, which is most of the noise; for a single-threaded,
    CPU-bound run with no I/O it is otherwise the same as ``wall``. The
    ratio ``cpu / wall`` says how much of the machine the run had.
    """

    wall: float
    cpu: float

    def on(self, clock: Clock) -> float:
        return self.cpu if clock == "cpu" else self.wall


class Stopwatch:
    """Started on creation; :meth:`elapsed` reads both clocks."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def elapsed(self) -> Elapsed:
        cpu = time.process_time() - self._cpu
        return Elapsed(time.perf_counter() - self._wall, cpu)


# -- reporting -----------------------------------------------------------------


def environment(loops: Sequence[LoopName]) -> dict[str, Any]:
    """What the numbers depend on, to print above them and store with them."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loops": [loop_version(name) for name in loops],
        "argv": sys.argv[1:],
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def markdown_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[bool] | None = None,
) -> str:
    """A GitHub markdown table, columns padded so it also reads as plain text.

    ``right[i]`` right-aligns column ``i`` (numbers); default: every column
    but the first few that hold text, guessed from the first row.
    """
    if right is None:
        right = [_looks_numeric(cell) for cell in rows[0]] if rows else [False] * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1))
        for w, r in zip(widths, right, strict=True)
    )
    return "\n".join([line(headers), rule + "|", *(line(row) for row in rows)])


def _looks_numeric(cell: str) -> bool:
    stripped = cell.strip().rstrip("x%").replace("±", "").replace("+", "").replace("..", " ")
    try:
        float(stripped.split()[0] if stripped else "x")
    except ValueError:
        return False
    return True


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Dump ``payload`` (dataclasses allowed) as indented JSON."""

    def default(obj: object) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)  # type: ignore[call-overload]
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=default, allow_nan=True)
        fh.write("\n")
