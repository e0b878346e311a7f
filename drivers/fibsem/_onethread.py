"""Call an object only from the thread that created it.

A COM object such as SmartSEM's ``CZ.EMApiCtrl.1`` lives in the apartment of
the thread that made it; the bridge server calls its backend from a request
thread and from operation worker threads. Routing every call through one
dedicated thread keeps COM's rules without each driver method knowing them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["OneThread"]


class OneThread:
    """A proxy whose method calls all run on one thread, the one that built the object."""

    def __init__(self, factory: Callable[[], Any], *, initializer: Callable[[], None] | None = None, name: str = "vendor-api") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=initializer)
        self._target = self._pool.submit(factory).result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            # the name is resolved on the owning thread too: a COM dispatch lookup is itself a call
            return self._pool.submit(lambda: getattr(self._target, name)(*args, **kwargs)).result()

        return call

    def close(self) -> None:
        self._pool.shutdown(wait=True)
