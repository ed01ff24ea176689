"""Quick start: 100 concurrent callers, a handful of sink calls.

Run it: ``python examples/quickstart.py``
"""

from __future__ import annotations

import asyncio

from asyncbatch import Batcher


async def square_all(numbers: list[int]) -> list[int]:
    """The sink: one call answers a whole batch, one result per item, in order."""
    print(f"sink called with {len(numbers)} items")
    await asyncio.sleep(0.01)  # one round trip for the whole batch
    return [n * n for n in numbers]


async def main() -> list[int]:
    async with Batcher(square_all, max_size=32, max_wait=0.005) as batcher:
        # Each caller awaits its own item's result; the batcher groups them.
        results = await asyncio.gather(*(batcher.submit(n) for n in range(100)))
    print(results[:5], "...", results[-1])
    print(batcher.stats)
    return results


if __name__ == "__main__":
    asyncio.run(main())
