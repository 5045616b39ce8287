"""AttentionService: one attention shard (a layer range with its KV cache), and the gateway's chain
of shard clients that runs a whole step (`ShardChain`, an engine `StepRunner`).

Per step only token ids (into the first shard), the step's hidden states (between shards) and the
sampled ids (out of the last) travel. Inside a shard every layer calls its MoE (the router) once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import grpc
import torch

from expertmesh.model.batch import StepBatch
from expertmesh.model.decoder import DecoderStack
from expertmesh.sampling import Sampler
from expertmesh.scheduler import CacheLostError, StepPlan
from expertmesh.services import codec
from expertmesh.services.access import InternalTLS
from expertmesh.services.convert import sampling_from_pb, sampling_to_pb
from expertmesh.services.metrics import AttentionMetrics
from expertmesh.services.router import AsyncMoE
from expertmesh.services.internal import (DEFAULT_MAX_MESSAGE_BYTES, Connection, EventLoopThread,
                                         ServiceRestartedError, start_internal_server)
from expertmesh.v1 import attention_pb2, attention_pb2_grpc


HEAD_THREADS_MAX = 8
"""The last shard's LM head runs while every other component of the step waits (the groups idle
until the next step), so by default it takes the node's cores, up to this many. On 2 cores, small
preset (a [32000, 512] fp32 head), 32 rows: 21-22 ms on 1 thread, 12-13 ms on 2
(`benchmarks/bench_linear.py`); a single row takes the matrix-vector path, 4-5 ms on either.
Component processes run OpenMP with a short spin (`orchestrator/cluster.py`), so the team sleeps
about 0.3 ms after the head instead of spinning on the cores the next step needs."""

PARALLEL_STEP_TOKENS = 32
"""Steps of at least this many tokens run a shard's layers on `parallel_threads` torch threads. The
expert groups wait while a shard computes, so its cores are free; but an OpenMP team costs more than
it saves on a few rows (small preset, one layer's attention on 2 cores, 1 vs 2 threads: 0.70 vs 0.55 ms
at 1 token, 1.03 vs 1.13 ms at 16, 2.82 vs 1.87 ms at 32; in the cluster at concurrency 1, 2 threads
were no faster), so smaller steps, decoding at low load, keep `threads`. The MoE calls between the
layers (routing, the messages, the combine) always keep `threads`: while they wait, the groups have the
cores, and a team woken for the routing's small kernels would spin on them."""


class AttentionServicer(attention_pb2_grpc.AttentionServiceServicer):
    """Protobuf in -> StepBatch and inputs, checked -> the stack -> hidden states or sampled ids.

    The stack runs on the server's loop thread and stops at each layer's MoE seam while the router
    (`moe`, awaited) answers: no thread hand-off anywhere in a step."""

    def __init__(self, stack: DecoderStack, moe: AsyncMoE, metrics: AttentionMetrics | None = None, name: str = "0",
                 threads: int | None = None, parallel_threads: int | None = None, head_threads: int | None = None):
        """`threads`, `parallel_threads`: torch CPU threads for steps below and from PARALLEL_STEP_TOKENS
        tokens; `head_threads`: for the LM head of the last shard (None: leave the setting alone)."""
        self.stack, self.moe, self.metrics, self.name = stack, moe, metrics, name
        self.threads, self.parallel_threads = threads, parallel_threads or threads
        self.head_threads = head_threads if stack.last else None
        self._last_layer = max(stack.layers)
        self.sampler = Sampler(stack.device)

    async def Step(self, request, context):
        return await self.step(request)

    async def StepStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.step(request)

    async def step(self, request: attention_pb2.StepRequest) -> attention_pb2.StepResponse:
        start = time.perf_counter()
        reply = await self._step(request)
        if self.metrics is not None:
            phase = "prefill" if any(s.q_len > 1 for s in request.seqs) else "decode"
            self.metrics.step.labels(self.name, phase).observe(time.perf_counter() - start)
        return reply

    async def _step(self, request) -> attention_pb2.StepResponse:
        for rid in request.released:
            self.sampler.release(rid)
        batch = self._batch(request.seqs)
        if self.stack.first:
            if len(request.token_ids) != batch.num_tokens:
                raise ValueError(f"token_ids: {len(request.token_ids)} ids for {batch.num_tokens} step tokens")
            if any(t >= self.stack.cfg.vocab_size for t in request.token_ids):
                raise ValueError("token_ids: id outside the vocabulary")
            inputs = torch.tensor(list(request.token_ids), dtype=torch.long, device=self.stack.device)
        else:
            inputs = codec.decode(request.hidden, "hidden", self.stack.dtype,
                                  (batch.num_tokens, self.stack.cfg.hidden_size), self.stack.device)
        layer_threads = self.parallel_threads if batch.num_tokens >= PARALLEL_STEP_TOKENS else self.threads
        _use_threads(layer_threads)
        out = await self._forward(batch, inputs, layer_threads)
        if not self.stack.last:
            return attention_pb2.StepResponse(hidden=codec.encode(out))
        rows = [i for i, s in enumerate(request.seqs) if s.sample]
        if not rows:
            return attention_pb2.StepResponse()
        seqs = [request.seqs[i] for i in rows]
        logits = out if len(rows) == len(out) else out[rows]  # decoding: every row, and no copy
        ids = self.sampler(logits, [s.request_id for s in seqs], [sampling_from_pb(s.sampling) for s in seqs])
        return attention_pb2.StepResponse(next_token_ids=ids)

    async def _forward(self, batch: StepBatch, inputs: torch.Tensor, layer_threads: int | None) -> torch.Tensor:
        steps = self.stack.steps(batch, inputs)
        try:
            layer, x = next(steps)
            while True:
                _use_threads(self.threads)  # routing and combine: the expert groups have the cores
                y = await self.moe(layer, x)
                # what the stack computes next: the head (if it has one) after the last layer, else attention
                _use_threads(self.head_threads if layer == self._last_layer else layer_threads)
                layer, x = steps.send(y)
        except StopIteration as done:
            return done.value

    def _batch(self, seqs: Sequence[attention_pb2.SequenceStep]) -> StepBatch:
        cache = self.stack.cache
        if not seqs:
            raise ValueError("seqs: a step needs at least one sequence")
        slots = [s.slot for s in seqs]
        if len(set(slots)) != len(slots) or max(slots) >= cache.num_slots:
            raise ValueError(f"seqs: slots must be distinct and below {cache.num_slots}")
        if any(s.q_len < 1 or s.start + s.q_len > cache.max_len for s in seqs):
            raise ValueError(f"seqs: every q_len must be >= 1 and start + q_len <= {cache.max_len}")
        return StepBatch.build(slots, [s.start for s in seqs], [s.q_len for s in seqs],
                               self.stack.cfg.sliding_window, self.stack.device)

    async def Describe(self, request, context):
        return attention_pb2.DescribeShardResponse(layers=list(self.stack.layers), num_slots=self.stack.cache.num_slots,
                                                   max_len=self.stack.cache.max_len)


def _use_threads(n: int | None) -> None:
    if n and n != torch.get_num_threads():
        torch.set_num_threads(n)


async def serve_attention(servicer: AttentionServicer, address: str = "127.0.0.1:0",
                          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                          tls: InternalTLS | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a shard server on the running loop; returns it and the port it bound. Steps of one shard
    never overlap (the gateway runs one step at a time)."""
    return await start_internal_server(servicer, attention_pb2_grpc.add_AttentionServiceServicer_to_server,
                                       address, max_message_bytes, tls)


class ShardChain:
    """The attention shards in layer order, as the engine's `StepRunner` (called from its thread):
    one message per shard and step, on a stream to each shard.

    Not split into micro-batches: on CPU the experts are memory-bound, and two micro-batches read
    every expert's weights twice per layer (measured: 0.47x instead of 0.66x of the single-process
    engine at concurrency 32, benchmarks/results/cluster_vs_engine.md)."""

    def __init__(self, addresses: Sequence[str], timeout_s: float = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 resolvers: Sequence[Callable[[], str] | None] | None = None, tls: InternalTLS | None = None,
                 owner: object = None):
        """`resolvers[k]`, if given, waits for shard k to be back after a restart and returns its
        address: a step that finds it gone then raises `CacheLostError` (its KV cache went with it)
        and the engine re-prefills every running sequence. `owner` is held for as long as the chain
        is: whatever keeps the components alive (a Ray actor lives while a handle to it does)."""
        self.owner = owner
        self._loop = EventLoopThread("shard-chain")
        self._loop.run(self._connect(addresses, timeout_s, max_message_bytes, resolvers or [None] * len(addresses),
                                     tls))
        self._released: list[str] = []

    async def _connect(self, addresses: Sequence[str], timeout_s: float, max_message_bytes: int,
                       resolvers: Sequence[Callable[[], str] | None], tls: InternalTLS | None) -> None:
        self.shards = [Connection(a, lambda c: attention_pb2_grpc.AttentionServiceStub(c).StepStream,
                                  "attention shard", timeout_s, max_message_bytes, resolve, resend=False, tls=tls)
                       for a, resolve in zip(addresses, resolvers)]

    def run(self, plan: StepPlan) -> list[int]:
        released, self._released = self._released, []
        try:
            return self._loop.run(self._run(plan, released))
        except ServiceRestartedError as exc:
            raise CacheLostError(str(exc)) from exc

    async def _run(self, plan: StepPlan, released: list[str]) -> list[int]:
        seqs = [attention_pb2.SequenceStep(request_id=s.request_id, slot=s.slot, start=start, q_len=q, sample=smp,
                                           sampling=sampling_to_pb(s.params))
                for s, start, q, smp in zip(plan.seqs, plan.starts, plan.q_lens, plan.sample)]
        last = len(self.shards) - 1
        reply = None
        for k, shard in enumerate(self.shards):
            request = attention_pb2.StepRequest(seqs=seqs, released=released if k == last else [])
            if k == 0:
                request.token_ids.extend(plan.token_ids)
            else:
                request.hidden.CopyFrom(reply.hidden)
            reply = await shard(request)
        return list(reply.next_token_ids)

    def release(self, request_id: str) -> None:
        self._released.append(request_id)  # told to the last shard with the next step

    def close(self) -> None:
        async def close():
            for shard in self.shards:
                await shard.close()

        self._loop.run(close())
        self._loop.close()
        self.owner = None  # the components may go now
