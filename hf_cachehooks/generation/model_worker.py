"""The completion server's model worker: one daemon thread runs every request's work on the model, in turn.

A request's work is a generator run on the worker; each item it yields reaches the event loop through an asyncio
queue. No lock is held across a `yield` to the web server: a client that leaves only sets its job's stop flag,
which decoding reads after every token, so the next request gets the model at once. The thread is a daemon, so
stopping the server never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Generator
from typing import Any

from ..errors import HFCacheHooksError

log = logging.getLogger(__name__)

END = object()  # a job's last message
Produce = Callable[[Callable[[], bool]], Generator[Any, None, None]]  # (stopped) -> the items of one answer


class ClientGone(HFCacheHooksError):
    """The request's client has left: raised inside the work to stop it at this token, and by `start` when the
    client left before the first item. Never reaches a user: the server answers nobody for it."""


class Job:
    """One request's work: run by the worker thread, read on the event loop.

    The worker runs `produce(stopped)` and posts each item it yields; `cancel()` (client gone, response closed)
    makes `stopped()` true, so decoding ends at the next token.
    """

    def __init__(self, produce: Produce) -> None:
        self.produce = produce
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def stopped(self) -> bool:
        return self.cancelled.is_set()

    def cancel(self) -> None:
        """Stop the work at its next token (call on the event loop); whoever waits on `next()` gets `END`."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.queue.put_nowait(END)

    async def next(self) -> Any:
        """The next item, `END` after the last; an error the work raised is raised here."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def run(self) -> None:
        """On the worker thread: post every item (stop at the next token once cancelled), then `END`."""
        if self.stopped():
            return
        items = self.produce(self.stopped)
        try:
            for item in items:
                self._post(item)
                if self.stopped():
                    break
        except ClientGone:
            pass
        except Exception as exc:  # the request's own error (a 400, a crash): raised to its handler
            self._post(exc)
        finally:
            items.close()
        self._post(END)

    def _post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is waiting
            self.cancelled.set()


class ModelWorker:
    """The thread that owns the model: jobs run one at a time, in the order they came."""

    def __init__(self, name: str = "hf-cachehooks serve: model") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self, request: Any, produce: Produce) -> tuple[Job, Any]:
        """Queue `produce`; its job and first item, once there (an error the work raised is raised here).

        The job is cancelled if the client (`request`, a Starlette request) disconnects while this waits; the
        caller cancels it when it needs no more items.

        Raises:
            ClientGone: the client left before the first item.
        """
        job = Job(produce)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            first = await job.next()
        except BaseException:
            job.cancel()
            raise
        finally:
            watcher.cancel()
        if first is END:
            job.cancel()
            raise ClientGone
        return job, first

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.run()
            except Exception:  # never lose the worker: the next request still gets the model
                log.exception("The model worker failed on a request; it goes on with the next one")


async def _cancel_on_disconnect(request: Any, job: Job, every: float = 0.1) -> None:
    """Cancel `job` once the client has disconnected (polled until this task is cancelled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.cancel()
