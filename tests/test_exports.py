"""The public surface: what ``asyncbatch`` exports, and how it presents itself."""

from __future__ import annotations

import inspect

import asyncbatch


def test_all_is_sorted_and_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(asyncbatch).items()
        if not name.startswith("_") and not inspect.ismodule(value)  # submodules: contrib
    }
    # ruff's RUF022 order: CONSTANTS first, then the rest in ASCII order.
    assert asyncbatch.__all__ == sorted(asyncbatch.__all__, key=lambda n: (not n.isupper(), n))
    assert set(asyncbatch.__all__) == public


def test_public_objects_say_asyncbatch() -> None:
    for name in asyncbatch.__all__:
        obj = getattr(asyncbatch, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "asyncbatch", name
    assert repr(asyncbatch.Batcher) == "<class 'asyncbatch.Batcher'>"


def test_errors_share_one_root() -> None:
    for name in ("BatcherClosed", "QueueFull", "ResultMismatch"):
        assert issubclass(getattr(asyncbatch, name), asyncbatch.AsyncBatchError)
    assert not issubclass(asyncbatch.AsyncBatchError, TimeoutError)


def test_private_modules_are_not_exported() -> None:
    assert not any(name.startswith("_") and name != "__version__" for name in asyncbatch.__all__)
    assert asyncbatch.__version__
