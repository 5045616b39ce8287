"""The engine loop: one thread owns the `Engine`; asyncio coroutines reach it through queues.

The engine is not thread-safe and `Engine.step()` blocks (it runs the model; in the cluster, remote
calls to attention shards), so every engine call (add, abort, step) happens on one dedicated thread.
Coroutines send commands through a thread-safe queue; the thread drains it between steps, which is
where new requests join the running batch (continuous batching itself is the scheduler's job), and
hands each step's outputs to the waiting coroutine with `loop.call_soon_threadsafe`. When the engine
has no work the thread blocks on the queue, so an idle loop costs nothing.

    coroutine --_Add/_Abort/_Stop--> queue.SimpleQueue --> engine thread: add | abort | step
    coroutine <--StepOutput | error-- asyncio.Queue per request <-- loop.call_soon_threadsafe
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from expertmesh.engine import Engine, GenerationRequest, StepOutput
from expertmesh.services.errors import status_for
from expertmesh.services.metrics import GatewayMetrics

log = logging.getLogger(__name__)

STEP_SLACK_S = 5.0
"""How long a stop waits past its grace period for the step under way. A step takes milliseconds to
a few seconds (a long prefill); one still running after this has hung, and the gateway stops without
it (`Gateway.stop`), so that a shutdown ends within the grace period and a few seconds."""


class EngineUnavailableError(RuntimeError):
    """The engine cannot serve the request (a step failed, or the loop is stopping): UNAVAILABLE."""


class _Ticket:
    """One request as both threads see it. The engine thread resolves it; the event loop reads it."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.admitted: asyncio.Future[None] = self.loop.create_future()  # None, or engine.add's error
        self.outputs: asyncio.Queue[StepOutput | Exception] = asyncio.Queue()

    # Engine-thread side: each call schedules the update on the request's event loop.
    def admit(self, error: Exception | None) -> None:
        self._post(_resolve, self.admitted, error)

    def deliver(self, item: StepOutput | Exception) -> bool:
        """Queue an output (or the error that ends the request); False if its event loop is gone."""
        return self._post(self.outputs.put_nowait, item)

    def _post(self, fn, *args) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # the caller was cancelled while waiting for admission
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass(frozen=True)
class _Add:
    ticket: _Ticket
    prompt_ids: list[int]


@dataclass(frozen=True)
class _Abort:
    ticket: _Ticket  # the ticket, not just the id: a rejected duplicate must not abort the original


@dataclass(frozen=True)
class _Stop:
    grace_s: float


class Generation:
    """One request in flight, as an async context manager and an async iterator of `StepOutput`s.

    Entering adds the request to the engine and raises what `Engine.add` raised (ValueError,
    QueueFullError) or EngineUnavailableError, before any output. Iterating yields each step's output;
    the last has `finish_reason` set. Leaving early (cancellation, deadline, error) aborts the request,
    which frees its KV-cache slot for the next step.
    """

    def __init__(self, engine_loop: EngineLoop, request: GenerationRequest):
        self._engine_loop, self._request = engine_loop, request
        self._ticket: _Ticket | None = None
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    async def __aenter__(self) -> Generation:
        # Validated and tokenized here, on a worker thread (sentencepiece lets go of the GIL): a long
        # prompt never holds up the engine thread, and with it every running request.
        try:
            ids = await asyncio.to_thread(self._engine_loop.engine.prompt_ids, self._request)
        except ValueError as exc:
            self._engine_loop.count_rejection(exc)
            raise
        self._ticket = self._engine_loop._submit(_Add(_Ticket(self._request), ids))
        try:
            await self._ticket.admitted
        except asyncio.CancelledError:
            self._engine_loop._submit(_Abort(self._ticket))
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        if not self._finished:
            self._finished = True
            self._engine_loop._submit(_Abort(self._ticket))

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> StepOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._ticket.outputs.get()
        if isinstance(item, Exception):
            self._finished = True
            raise item
        self._finished = item.finish_reason is not None
        return item


class EngineLoop:
    """Runs an `Engine` on its own thread; `generate()` and `complete()` are called from asyncio."""

    def __init__(self, engine: Engine, name: str = "engine-loop", metrics: GatewayMetrics | None = None,
                 diagnose: Callable[[], list[str]] | None = None):
        """`diagnose`, asked after a step fails: the components gone for good (`Cluster.lost`). If
        any, the loop is broken: every request fails UNAVAILABLE saying so, and `on_broken` (set by
        the gateway, to report NOT_SERVING) is called once with the reason."""
        self.engine, self.metrics, self.diagnose = engine, metrics, diagnose
        self.on_broken: Callable[[str], None] | None = None
        self._broken: str | None = None  # why the loop can serve no more; guarded by _lock
        self._seen: dict[str, tuple[float, float | None]] = {}  # engine thread only: (arrival, last output)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Ticket] = {}  # engine thread only: admitted requests by id
        self._stop_at: float | None = None  # engine thread only: monotonic deadline once stopping
        self._accepting = True  # guarded by _lock, so that no _Add is queued behind the _Stop
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        """Start the engine thread (idempotent)."""
        if not self._thread.is_alive() and self._accepting:
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def generate(self, request: GenerationRequest) -> Generation:
        """`async with loop.generate(request) as gen: async for out in gen: ...` (id assigned if empty)."""
        return Generation(self, dataclasses.replace(request, request_id=request.request_id or uuid.uuid4().hex))

    async def complete(self, request: GenerationRequest) -> StepOutput:
        """Run a request to the end; one StepOutput holding every generated id and the whole text."""
        token_ids, texts, last = [], [], None
        async with self.generate(request) as generation:
            async for last in generation:
                token_ids += last.token_ids
                texts.append(last.text)
        return dataclasses.replace(last, token_ids=token_ids, text="".join(texts))

    def stop(self, grace_s: float, join_slack_s: float = STEP_SLACK_S) -> None:
        """Stop accepting; let in-flight requests finish within `grace_s`, fail the rest UNAVAILABLE,
        and end the thread. Blocks until then, and for at most `join_slack_s` more: the loop ends
        between steps, so a step under way when the grace runs out finishes first."""
        with self._lock:
            self._accepting = False
            if not self._thread.is_alive():
                return
            self._commands.put(_Stop(grace_s))
        self._thread.join(grace_s + join_slack_s)
        if self._thread.is_alive():
            log.warning("engine loop did not end within %.1f s of its grace period", join_slack_s)

    def count_rejection(self, exc: Exception) -> None:
        """Count a request refused before it reached the engine thread (thread-safe)."""
        self._count(_code_of(exc))

    def _submit(self, command: _Add | _Abort) -> _Ticket:
        with self._lock:
            if isinstance(command, _Add) and self._broken is not None:
                raise EngineUnavailableError(self._broken)
            if isinstance(command, _Add) and not (self._accepting and self._thread.is_alive()):
                raise EngineUnavailableError("the engine is not accepting requests (stopped or stopping)")
            self._commands.put(command)
        return command.ticket

    # ---- everything below runs on the engine thread ----

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - a bug; logged, and every waiting request is failed below
            log.exception("engine loop crashed")
            self._break("the engine loop crashed (see the server's log)")
        finally:  # nothing may wait forever on a thread that is gone
            with self._lock:
                self._accepting = False
            if self._stop_at is None:
                self._stop_at = time.monotonic()
            for command in self._take(block=False):
                self._apply(command)  # rejects late adds
            self._fail_all(EngineUnavailableError("the engine stopped before the request finished"))

    def _serve(self) -> None:
        while True:
            idle = not self.engine.scheduler.has_work() and self._stop_at is None
            if idle:  # an abort or a failed step can empty the scheduler with no step after it to say so
                self._observe_scheduler()
            for command in self._take(block=idle):
                self._apply(command)
            if self._stop_at is not None and (not self.engine.scheduler.has_work()
                                              or time.monotonic() >= self._stop_at):
                return
            if self.engine.scheduler.has_work():
                self._step()

    def _take(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command) -> None:
        if isinstance(command, _Stop):
            self._stop_at = time.monotonic() + command.grace_s
        elif isinstance(command, _Abort):
            request_id = command.ticket.request.request_id
            if self._active.get(request_id) is command.ticket:
                del self._active[request_id]
                self._seen.pop(request_id, None)
                self._count("CANCELLED")
                self._abort(request_id)
        elif self._stop_at is not None:
            command.ticket.admit(EngineUnavailableError("the engine is stopping"))
        else:
            try:
                self.engine.add(command.ticket.request, command.prompt_ids)
            except Exception as exc:  # noqa: BLE001 - the caller's coroutine maps it to a status
                self._count(_code_of(exc))
                command.ticket.admit(exc)
                return
            self._active[command.ticket.request.request_id] = command.ticket
            self._seen[command.ticket.request.request_id] = (time.monotonic(), None)
            command.ticket.admit(None)

    def _step(self) -> None:
        batch = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - e.g. a remote shard failed; the loop lives on
            if isinstance(exc, grpc.RpcError):  # a component's error: its text says it, our stack does not
                log.error("engine step failed; failing %d requests: %s", len(self._active),
                          _describe(exc, limit=2000))
            else:
                log.exception("engine step failed; failing %d requests", len(self._active))
            self.mark_lost(self._lost())
            self._fail_all(EngineUnavailableError(self._broken or f"engine step failed: {_describe(exc)}"))
            return
        self._observe_step(min(batch, self.engine.scheduler.num_slots), outputs)
        for out in outputs:
            ticket = self._active.get(out.request_id)
            if ticket is None:
                continue
            if out.finish_reason is not None:
                del self._active[out.request_id]
            if not ticket.deliver(out) and out.finish_reason is None:
                del self._active[out.request_id]
                self._abort(out.request_id)

    def _lost(self) -> list[str]:
        if self.diagnose is None:
            return []
        try:
            return self.diagnose()
        except Exception:  # noqa: BLE001 - no diagnosis is no reason to stop serving
            log.exception("could not tell whether any component is gone for good")
            return []

    def mark_lost(self, gone: list[str]) -> None:
        """`gone`: components gone for good (`Cluster.lost`). If any, the loop is broken for good
        (thread-safe; the first reason stays)."""
        if gone:
            self._break(f"the cluster cannot serve: {'; '.join(gone)} gone for good (Ray's restarts used up); "
                        "the server must be restarted")

    def _break(self, reason: str) -> None:
        with self._lock:
            if self._broken is not None:
                return
            self._broken = reason
        log.error("%s", reason)
        if self.on_broken is not None:
            self.on_broken(reason)

    def _observe_step(self, batch: int, outputs) -> None:
        """Client-side latencies and scheduler state, once per step (engine thread)."""
        m = self.metrics
        if m is None:
            return
        now = time.monotonic()
        m.batch.observe(batch)
        for out in outputs:
            arrival, last = self._seen.get(out.request_id, (now, now))
            if last is None:
                m.ttft.observe(now - arrival)
                m.prompt_tokens.inc(out.prompt_tokens)
            else:
                m.itl.observe(now - last)
            m.generated_tokens.inc(len(out.token_ids))
            self._seen[out.request_id] = (arrival, now)
            if out.finish_reason is not None:
                m.e2e.observe(now - arrival)
                self._count("OK")
                self._seen.pop(out.request_id, None)
        self._observe_scheduler()

    def _observe_scheduler(self) -> None:
        """The scheduler gauges: after each step, and whenever the loop goes idle."""
        if self.metrics is None:
            return
        scheduler = self.engine.scheduler
        self.metrics.waiting.set(len(scheduler.waiting))
        self.metrics.running.set(len(scheduler.running))
        self.metrics.kv_used.set(scheduler.cache_used_ratio())

    def _count(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(code).inc()

    def _fail_all(self, error: EngineUnavailableError) -> None:
        """Fail every request, and abort every sequence the scheduler still holds (ours or not)."""
        for ticket in self._active.values():
            self._count("UNAVAILABLE")
            self._seen.pop(ticket.request.request_id, None)
            ticket.deliver(error)
        self._active.clear()
        scheduler = self.engine.scheduler
        for seq in [*scheduler.running, *scheduler.waiting]:
            self._abort(seq.request_id)

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - keep the loop alive; the scheduler may hold the slot
            log.exception("engine.abort(%r) failed", request_id)


def _describe(exc: Exception, limit: int = 300) -> str:
    """A failed step's error as clients see it: a gRPC error's code and details (not its debug
    string), else the error's first line, at most `limit` characters; the log has the rest (Ray's
    errors can carry a memory report listing the host's processes)."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        text = f"{exc.code().name}: {exc.details()}"
    else:
        text = str(exc).strip().split("\n", 1)[0] or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _code_of(exc: Exception) -> str:
    """The gRPC status name an admission error gets (the servicer maps it the same way)."""
    if isinstance(exc, EngineUnavailableError):
        return "UNAVAILABLE"
    return status_for(exc).name
