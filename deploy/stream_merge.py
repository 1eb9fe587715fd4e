"""Run several generation streams at once and merge their outputs in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from pdserve.cluster.errors import WorkerError
from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.request_output import RequestOutput

Generate = Callable[[GenerateRequest], AsyncIterator[RequestOutput]]

_DONE = object()


async def merge_streams(
    generate: Generate, requests: list[GenerateRequest]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield ``(k, output)`` for ``requests[k]``'s outputs as they arrive, until every stream
    has sent its final output. Each stream runs as its own task.

    The first failure is raised here: an exception from a stream, a final output with
    ``finish_reason == "error"`` (as a WorkerError), or a stream that ends without a final
    output. When the consumer stops early (an error, a client that went away, ``aclose``),
    every stream still open is cancelled and closed, which lets its producer abort the request.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, req: GenerateRequest) -> None:
        stream = generate(req)
        try:
            finished = False
            async for out in stream:
                if finished:
                    continue  # nothing may follow the final output
                if out.finished and out.finish_reason == "error":
                    raise WorkerError(out.error or f"request {req.request_id} failed")
                finished = out.finished
                queue.put_nowait((k, out))
            if not finished:
                raise WorkerError(f"request {req.request_id} ended without a final output")
            queue.put_nowait((k, _DONE))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((k, e))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(requests)]
    try:
        open_streams = len(tasks)
        while open_streams:
            k, item = await queue.get()
            if item is _DONE:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
