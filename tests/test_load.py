"""A bounded load test of `expertmesh serve` (loopback only, bounded in count and in time).

The `tiny` checkpoint cut into 2 attention shards x 2 expert groups takes a warm-up and then
REQUESTS calls at CONCURRENCY in flight: unary and streaming, prompts of 1 to 60 tokens (ids or
text), some streams cancelled after a few chunks and some calls with a deadline too short to finish.
Every other call must end OK with exactly its `max_new_tokens`, and the server must count no status
but OK and CANCELLED. Afterwards the cluster holds nothing of the load: the scheduler gauges idle with
an empty KV cache, every slot free again (MAX_BATCH streams run at once), the same actors alive (none
restarted, none added), and every process's resident memory within RSS_TOLERANCE of its level after
the warm-up. The warm-up is the same mix at the same concurrency, and the step's token budget is
small, so that the warm-up has already grown what this load needs (allocator pools, kernels for each
step size, 64 concurrent gRPC streams at each hop): what grows after it is held by the load.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
from serving import alive_components, scrape, serve_process, wait_for_line, wait_serving

from expertmesh.v1 import generate_pb2, generate_pb2_grpc

CONCURRENCY = 64
REQUESTS = 512
WARMUP_REQUESTS = 192
MAX_BATCH = 16  # slots: with 64 in flight, a queue of waiting requests stands behind the running batch
# Steps use the default token budget (4096), so their row counts vary widely. oneDNN compiles and keeps
# a kernel for every row count; `Linear` bounds them (`padded_rows`). Before it did, the shards grew about
# 22% over this test.
MAX_PROMPT_TOKENS = 60
MAX_NEW_TOKENS = 8  # small, so that the test stays within a few minutes on a shared 2-core machine
CALL_TIMEOUT_S = 60  # every call has a deadline; the "deadline" calls a far shorter one
SHORT_DEADLINE_S = (0.05, 1.5)  # some expire while waiting, some mid-generation, some finish in time
LOAD_TIME_LIMIT_S = 240  # warm-up and load together
IDLE_TIMEOUT_S = 30  # last call answered -> scheduler gauges idle
RSS_TOLERANCE = 0.10
PROBE_NEW_TOKENS = 100  # long enough that none of MAX_BATCH streams ends while the slots are checked
# Prompt ids: Mixtral's vocabulary but <unk>, <s>, </s> (0-2) and the byte pieces (3-258), whose runs may
# end inside a UTF-8 character: the server rejects such a prompt (INVALID_ARGUMENT).
PIECES = range(259, 32000)
KINDS = {"unary": 35, "stream": 35, "cancel": 15, "deadline": 15}  # weights in the mix
WORDS = ("the", "experts", "route", "each", "token", "to", "two", "of", "eight", "layers", "attention",
         "shard", "cache", "grows", "and", "frees", "a", "slot", "when", "done", "é", "日本")


@dataclass(frozen=True)
class Call:
    """One call of the mix and how the client plays it. kind: "unary" | "stream" | "cancel" (a stream
    cancelled after `cancel_after` chunks, before its last) | "deadline" (unary or stream, timeout_s short)."""

    kind: str
    stream: bool
    request: generate_pb2.GenerateRequest
    timeout_s: float = CALL_TIMEOUT_S
    cancel_after: int = 0


def mix(n: int, seed: int) -> list[Call]:
    """`n` calls drawn with a seeded generator: kinds by KINDS, prompts as ids (4 in 5) or text."""
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        new_tokens = rng.randint(2 if kind == "cancel" else 1, MAX_NEW_TOKENS)
        sampling = generate_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        if rng.random() < 0.2:  # 1 to 30 words: at most ~60 tokens
            request = generate_pb2.GenerateRequest(prompt=" ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
                                                   sampling=sampling)
        else:
            ids = rng.choices(PIECES, k=rng.randint(1, MAX_PROMPT_TOKENS))
            request = generate_pb2.GenerateRequest(prompt_token_ids=ids, sampling=sampling)
        if kind == "cancel":
            calls.append(Call(kind, True, request, cancel_after=rng.randint(1, new_tokens - 1)))
        elif kind == "deadline":
            calls.append(Call(kind, rng.random() < 0.5, request, timeout_s=rng.uniform(*SHORT_DEADLINE_S)))
        else:
            calls.append(Call(kind, kind == "stream", request))
    return calls


def what_is_wrong(call: Call, responses: list) -> str | None:
    """What is wrong with a finished call's responses (the unary reply, or the stream's messages)."""
    if not responses:
        return "no response"
    want, last = call.request.sampling.max_new_tokens, responses[-1]
    tokens = sum(len(r.token_ids) for r in responses)
    if tokens != want or last.usage.completion_tokens != want:
        return f"{tokens} tokens (usage {last.usage.completion_tokens}) for max_new_tokens {want}"
    if [r.finish_reason for r in responses] != [0] * (len(responses) - 1) + [generate_pb2.FINISH_REASON_LENGTH]:
        return f"finish reasons {[r.finish_reason for r in responses]}"
    prompt = call.request.prompt_token_ids
    if prompt and last.usage.prompt_tokens != len(prompt):
        return f"usage.prompt_tokens {last.usage.prompt_tokens} for {len(prompt)} prompt ids"
    if len({r.request_id for r in responses}) != 1 or not last.request_id:
        return f"request ids {sorted({r.request_id for r in responses})}"
    return None


async def play(stub, call: Call) -> str:
    """Make one call; its outcome: "ok", "cancelled" (cancelled by us mid-stream), "deadline" (a short
    deadline that expired), or what went wrong, as "CODE: details"."""
    try:
        if not call.stream:
            return what_is_wrong(call, [await stub.Generate(call.request, timeout=call.timeout_s)]) or "ok"
        responses = []
        stream = stub.GenerateStream(call.request, timeout=call.timeout_s)
        async for response in stream:
            responses.append(response)
            if len(responses) == call.cancel_after:
                stream.cancel()
                return "cancelled"
        return what_is_wrong(call, responses) or "ok"
    except grpc.aio.AioRpcError as exc:
        if call.kind == "deadline" and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline"
        return f"{exc.code().name}: {exc.details()}"


async def load(address: str, calls: list[Call]) -> Counter:
    """Play `calls` with CONCURRENCY in flight on one channel; the count of each outcome."""
    outcomes: Counter = Counter()
    pending = iter(calls)  # shared by the workers: each call is played once
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)

        async def worker() -> None:
            for call in pending:
                outcomes[await play(stub, call)] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


def run_load(address: str, calls: list[Call], deadline: float) -> tuple[Counter, float]:
    """`load`, failing once the monotonic `deadline` passes; the outcomes and the wall time."""
    start = time.monotonic()
    try:
        outcomes = asyncio.run(asyncio.wait_for(load(address, calls), deadline - start))
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
        raise AssertionError(f"{len(calls)} calls did not finish within the {LOAD_TIME_LIMIT_S} s limit") from None
    errors = {k: n for k, n in outcomes.items() if k not in ("ok", "cancelled", "deadline")}
    assert not errors, f"calls that failed (outcome: count): {errors}"
    return outcomes, time.monotonic() - start


def gauge(families: dict[str, list], name: str) -> float:
    [sample] = families[name]
    return sample.value


def wait_idle(metrics_url: str) -> dict[str, list]:
    """Scrape until the scheduler has no running and no waiting request; that scrape's families."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        families = scrape(metrics_url)
        busy = {n: gauge(families, f"expertmesh_scheduler_{n}_requests") for n in ("running", "waiting")}
        if not any(busy.values()):
            return families
        assert time.monotonic() < deadline, f"scheduler not idle {IDLE_TIMEOUT_S} s after the last call: {busy}"
        time.sleep(0.5)


def actors() -> dict[str, tuple[str, int, int]]:
    """The live components by actor id: class, pid, restarts (a restarted actor has a new pid)."""
    return {a.actor_id: (a.class_name, a.pid, a.num_restarts) for a in alive_components()}


def rss_bytes(pid: int) -> int:
    """Resident set size (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def drain(proc, lines: list[str]) -> None:
    """Keep reading the server's output into `lines`, so that a full pipe never blocks its logging."""
    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, name="serve-output", daemon=True).start()


async def hold_every_slot(address: str, metrics_url: str) -> dict[str, float]:
    """MAX_BATCH long streams at once; once each has its first token, the scheduler gauges (all of
    them running means every KV-cache slot was free: a leaked one keeps a stream waiting until
    another finishes). Then all are cancelled."""
    sampling = generate_pb2.SamplingParams(max_new_tokens=PROBE_NEW_TOKENS, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        streams = [stub.GenerateStream(generate_pb2.GenerateRequest(prompt_token_ids=[100 + k], sampling=sampling),
                                       timeout=CALL_TIMEOUT_S) for k in range(MAX_BATCH)]
        try:
            await asyncio.gather(*(s.read() for s in streams))
            families = await asyncio.to_thread(scrape, metrics_url)
        finally:
            for s in streams:
                s.cancel()
    return {n: gauge(families, f"expertmesh_scheduler_{n}_requests") for n in ("running", "waiting")}


def check_request_codes(families: dict[str, list], outcomes: Counter, sent: int) -> None:
    """The server counted each call at most once, as OK or CANCELLED and nothing else, and at least every
    call the client saw OK; only a call whose short deadline expired may not have reached the engine."""
    codes = {s.labels["code"]: s.value for s in families["expertmesh_gateway_requests"] if s.name.endswith("_total")}
    assert set(codes) <= {"OK", "CANCELLED"}, codes
    counted = codes.get("OK", 0) + codes.get("CANCELLED", 0)
    assert codes.get("OK", 0) >= outcomes["ok"] and sent - outcomes["deadline"] <= counted <= sent, (codes, outcomes)


def test_bounded_load_leaves_nothing_behind(ray_cluster, tiny_ckpt):
    with serve_process(tiny_ckpt, ray_cluster.address, "--attention-shards", "2", "--expert-groups", "2",
                       "--max-batch-size", str(MAX_BATCH), "--max-waiting", str(4 * CONCURRENCY),
                       "--max-seq-len", "128", "--threads", "1",
                       "--metrics-port", "0") as (proc, lines):
        metrics_url = wait_for_line(proc, lines, r"metrics on (http://\S+/metrics)")
        address = wait_for_line(proc, lines, r"serving .* on (\S+:\d+)")
        drain(proc, lines)
        wait_serving(address)
        deadline = time.monotonic() + LOAD_TIME_LIMIT_S

        warm, _ = run_load(address, mix(WARMUP_REQUESTS, seed=1), deadline)
        wait_idle(metrics_url)
        components = actors()
        assert sorted(c for c, _, _ in components.values()) == sorted(
            ["AttentionShardComponent", "RouterComponent", "ExpertGroupComponent"] * 2)
        pids = {"serve": proc.pid} | dict(sorted((f"{c.removesuffix('Component')}:{pid}", pid)
                                                 for c, pid, _ in components.values()))
        before = {name: rss_bytes(pid) for name, pid in pids.items()}

        outcomes, wall_s = run_load(address, mix(REQUESTS, seed=2), deadline)
        families = wait_idle(metrics_url)
        after = {name: rss_bytes(pid) for name, pid in pids.items()}
        assert gauge(families, "expertmesh_scheduler_kv_cache_used_ratio") == 0
        assert asyncio.run(hold_every_slot(address, metrics_url)) == {"running": MAX_BATCH, "waiting": 0}
        families = wait_idle(metrics_url)
        check_request_codes(families, warm + outcomes, WARMUP_REQUESTS + REQUESTS + MAX_BATCH)
        assert actors() == components, "an actor died, restarted or was added under load"

        mib = ", ".join(f"{n} {before[n] / 2**20:.0f}->{after[n] / 2**20:.0f}" for n in pids)
        print(f"\nload: {REQUESTS} requests at concurrency {CONCURRENCY} in {wall_s:.1f} s: {outcomes['ok']} ok, "
              f"{outcomes['cancelled']} cancelled mid-stream, {outcomes['deadline']} past a short deadline "
              f"(after {WARMUP_REQUESTS} warm-up); RSS MiB after warm-up->after load: {mib}")
        grown = {n: f"{after[n] / before[n] - 1:+.1%}" for n in pids
                 if abs(after[n] - before[n]) > RSS_TOLERANCE * before[n]}
        assert not grown, f"resident memory moved more than {RSS_TOLERANCE:.0%} under load: {grown}"
