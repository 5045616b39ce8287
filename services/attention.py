"""AttentionService: one attention shard (a layer range with its KV cache), and the gateway's chain
of shard clients that runs a whole step (`ShardChain`, an engine `StepRunner`).

Per step only token ids (into the first shard), the step's hidden states (between shards) and the
sampled ids (out of the last) travel. Inside a shard every layer calls its MoE (the router) once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import torch

from expertmesh.model.batch import StepBatch
from expertmesh.model.decoder import DecoderStack
from expertmesh.sampling import Sampler
from expertmesh.scheduler import StepPlan
from expertmesh.services import codec
from expertmesh.services.convert import sampling_from_pb, sampling_to_pb
from expertmesh.services.metrics import AttentionMetrics
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, channel_options, start_internal_server
from expertmesh.v1 import attention_pb2, attention_pb2_grpc


class AttentionServicer(attention_pb2_grpc.AttentionServiceServicer):
    """Protobuf in -> StepBatch and inputs, checked -> the stack -> hidden states or sampled ids."""

    def __init__(self, stack: DecoderStack, metrics: AttentionMetrics | None = None, name: str = "0"):
        self.stack, self.metrics, self.name = stack, metrics, name
        self.sampler = Sampler(stack.device)

    def Step(self, request, context):
        start = time.perf_counter()
        reply = self._step(request)
        if self.metrics is not None:
            phase = "prefill" if any(s.q_len > 1 for s in request.seqs) else "decode"
            self.metrics.step.labels(self.name, phase).observe(time.perf_counter() - start)
        return reply

    def _step(self, request) -> attention_pb2.StepResponse:
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
        out = self.stack.forward(batch, inputs)
        if not self.stack.last:
            return attention_pb2.StepResponse(hidden=codec.encode(out))
        rows = [i for i, s in enumerate(request.seqs) if s.sample]
        if not rows:
            return attention_pb2.StepResponse()
        seqs = [request.seqs[i] for i in rows]
        ids = self.sampler(out[rows], [s.request_id for s in seqs], [sampling_from_pb(s.sampling) for s in seqs])
        return attention_pb2.StepResponse(next_token_ids=ids)

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

    def Describe(self, request, context):
        return attention_pb2.DescribeShardResponse(layers=list(self.stack.layers), num_slots=self.stack.cache.num_slots,
                                                   max_len=self.stack.cache.max_len)


def serve_attention(servicer: AttentionServicer, address: str = "127.0.0.1:0", workers: int = 2,
                    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """Start a shard server; returns it and the port it bound. Steps of one shard never overlap (the
    gateway runs one step at a time), so two workers suffice: a step and a Describe."""
    return start_internal_server(servicer, attention_pb2_grpc.add_AttentionServiceServicer_to_server, address,
                                 workers, max_message_bytes)


class ShardChain:
    """The attention shards in layer order, as the engine's `StepRunner`."""

    def __init__(self, addresses: Sequence[str], timeout_s: float = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.timeout_s = timeout_s
        self.channels = [grpc.insecure_channel(a, options=channel_options(max_message_bytes)) for a in addresses]
        self.stubs = [attention_pb2_grpc.AttentionServiceStub(c) for c in self.channels]
        self._released: list[str] = []

    def run(self, plan: StepPlan) -> list[int]:
        seqs = [attention_pb2.SequenceStep(request_id=s.request_id, slot=s.slot, start=start, q_len=q, sample=smp,
                                           sampling=sampling_to_pb(s.params))
                for s, start, q, smp in zip(plan.seqs, plan.starts, plan.q_lens, plan.sample)]
        reply = self.stubs[0].Step(attention_pb2.StepRequest(seqs=seqs, token_ids=plan.token_ids,
                                                             released=self._released if len(self.stubs) == 1 else []),
                                   timeout=self.timeout_s)
        for stub in self.stubs[1:]:
            last = stub is self.stubs[-1]
            reply = stub.Step(attention_pb2.StepRequest(seqs=seqs, hidden=reply.hidden,
                                                        released=self._released if last else []),
                              timeout=self.timeout_s)
        self._released = []
        return list(reply.next_token_ids)

    def release(self, request_id: str) -> None:
        self._released.append(request_id)  # told to the last shard with the next step

    def close(self) -> None:
        for c in self.channels:
            c.close()
