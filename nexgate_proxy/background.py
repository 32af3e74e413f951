"""Background tasks: the one way they are stopped."""

from __future__ import annotations

import asyncio


async def stop_tasks(*tasks: asyncio.Future | None) -> None:
    """Cancel the tasks (None: none) and wait until they have ended.

    What a task ended with is not raised here: a background loop logs its own failures, and a
    stop must not fail because one of them did.
    """
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
