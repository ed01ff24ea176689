from __future__ import annotations

import asyncio

import pytest


@pytest.mark.looptime
async def test_virtual_time_is_exact() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.sleep(100)
    assert loop.time() - t0 == pytest.approx(100)


async def test_runs_on_every_flavour() -> None:
    assert asyncio.get_running_loop().is_running()
