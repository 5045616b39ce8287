"""The generation loop in three beats, `schedule -> run -> postprocess`, over any step runner.

In one process the runner is the whole model (`LocalRunner`); in the cluster it is the chain of
attention shards. Either way the engine validates requests, keeps the scheduler's books, turns sampled
ids into streamed text (detokenization, stop strings, EOS) and reports finish reasons.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from expertmesh.checkpoint import CheckpointReader
from expertmesh.model.batch import StepBatch
from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import DecoderStack
from expertmesh.model.load import load_local_model
from expertmesh.sampling import Sampler, SamplingParams
from expertmesh.scheduler import CacheLostError, Scheduler, Sequence, StepPlan
from expertmesh.stopping import StopMatcher
from expertmesh.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


MAX_REQUEST_ID_CHARS = 256
"""A request id is echoed in every streamed message; a longer one is refused."""


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt` (text, BOS added) and `prompt_token_ids` (used as given)."""

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = SamplingParams()
    request_id: str = ""


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: new ids, new text, and the finish reason once done."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated id, including a final EOS or stop token id
    text: str  # the completion, without EOS / stop token text and cut before a stop string
    finish_reason: str  # "length" | "eos" | "stop"


class StepRunner(Protocol):
    def run(self, plan: StepPlan) -> list[int]:
        """Run one step; return a sampled next id for each sequence with `plan.sample` set, in order."""
        ...

    def release(self, request_id: str) -> None:
        """Forget per-request state (sampling generator) of a finished request."""
        ...


class LocalRunner:
    """The whole model in this process; samples on the logits it produces."""

    def __init__(self, stack: DecoderStack):
        self.stack = stack
        self.sampler = Sampler(stack.device)

    def run(self, plan: StepPlan) -> list[int]:
        batch = StepBatch.build(plan.slots, plan.starts, plan.q_lens, self.stack.cfg.sliding_window,
                                self.stack.device)
        logits = self.stack.forward(batch, torch.tensor(plan.token_ids, device=self.stack.device))
        rows = [i for i, s in enumerate(plan.sample) if s]
        if not rows:
            return []
        seqs = [plan.seqs[i] for i in rows]
        return self.sampler(logits[rows], [s.request_id for s in seqs], [s.params for s in seqs])

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)


class _TextState:
    """Per-request text: incremental detokenization followed by stop-string matching."""

    def __init__(self, detok: IncrementalDetokenizer, stop: tuple[str, ...]):
        self.detok, self.matcher = detok, StopMatcher(stop)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.matcher.push(self.detok.push(token_id))

    def close(self) -> tuple[str, bool]:
        """End of generation: release held-back text; True if a stop string completed after all."""
        text, stopped = self.matcher.push(self.detok.flush())
        if not stopped:
            text += self.matcher.flush()
        return text, self.matcher.stopped


class Engine:
    """Validates requests and drives a scheduler and a step runner to completion."""

    def __init__(self, runner: StepRunner, tokenizer: Tokenizer, cfg: ModelConfig, scheduler: Scheduler):
        self.runner, self.tokenizer, self.cfg, self.scheduler = runner, tokenizer, cfg, scheduler
        self._text: dict[str, _TextState] = {}
        self._seqs: dict[str, Sequence] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str = "cpu", max_batch_size: int = 32, max_seq_len: int = 2048,
                        expert_groups: int = 1) -> Engine:
        """Load everything into this process. dtype defaults to fp32 on CPU (no fast bf16 there)."""
        reader = CheckpointReader(checkpoint_dir)
        cfg = reader.config
        dtype = dtype or (torch.float32 if device == "cpu" else reader.stored_dtype())
        max_len = min(max_seq_len, cfg.max_position_embeddings)
        stack = load_local_model(reader, max_batch_size, max_len, dtype, device, num_groups=expert_groups)
        return cls(LocalRunner(stack), Tokenizer.from_checkpoint(checkpoint_dir), cfg,
                   Scheduler(max_batch_size, max_len, max_tokens_per_step=max(4096, max_batch_size)))

    @property
    def max_len(self) -> int:
        return self.scheduler.max_len

    @property
    def max_prompt_chars(self) -> int:
        """Text longer than this cannot fit in the context: every token stands for at most
        `max_piece_chars` characters (twice that, for normalisers that merge characters)."""
        return 2 * self.tokenizer.max_piece_chars * self.max_len

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Validate a request and return its prompt ids. ValueError messages start with the field."""
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("prompt: exactly one of prompt and prompt_token_ids must be given")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id: at most {MAX_REQUEST_ID_CHARS} characters, got {len(request.request_id)}")
        request.params.validate(self.cfg.vocab_size)
        if request.prompt is not None:
            field = "prompt"
            if not request.prompt:
                raise ValueError("prompt: must not be empty")
            if len(request.prompt) > self.max_prompt_chars:  # refused before the tokenizer spends seconds on it
                raise ValueError(f"prompt: {len(request.prompt)} characters cannot fit in the context of "
                                 f"{self.max_len} tokens")
            ids = self.tokenizer.encode(request.prompt)
        else:
            field, ids = "prompt_token_ids", list(request.prompt_token_ids)
            if not ids:
                raise ValueError("prompt_token_ids: must not be empty")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) >= self.max_len:
            raise ValueError(f"{field}: {len(ids)} tokens leave no room in the context of {self.max_len} tokens")
        return ids

    def add(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for bad input, QueueFullError when full.
        `prompt_ids`: what `prompt_ids(request)` returned, if the caller ran it already (thread-safe,
        so a server tokenizes long prompts off the thread that steps the engine)."""
        ids = self.prompt_ids(request) if prompt_ids is None else prompt_ids
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._seqs:
            raise ValueError(f"request_id: {request_id!r} is already running")
        # Every check runs before the scheduler holds the sequence: one it held without text state
        # would fail the first step that samples for it, and with it every request in that step.
        try:
            detok = self.tokenizer.detokenizer(ids)
        except ValueError:  # only given ids can: encoded text never ends inside a character
            raise ValueError("prompt_token_ids: end inside a multi-byte UTF-8 character (the bytes generated "
                             "next would change the prompt's text)") from None
        text = _TextState(detok, request.params.stop)
        seq = Sequence(request_id, ids, request.params)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        self._text[request_id] = text
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request: its slot and cache are free for the next step."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._drop(seq, "abort")

    def step(self) -> list[StepOutput]:
        """schedule -> run -> postprocess, once. Returns an output for each sequence that sampled."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        try:
            new_ids = self.runner.run(plan)
        except CacheLostError:
            log.warning("the KV cache was lost; re-prefilling %d running sequences", len(plan.seqs))
            self.scheduler.recompute()
            return []
        self.scheduler.complete(plan)
        sampled = [seq for seq, s in zip(plan.seqs, plan.sample) if s]
        return [self._postprocess(seq, tok) for seq, tok in zip(sampled, new_ids)]

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.output_ids.append(token)
        params, text, reason = seq.params, "", None
        if token == self.cfg.eos_token_id and not params.ignore_eos:
            reason = "eos"
        elif token in params.stop_token_ids:
            reason = "stop"
        else:
            text, stopped = self._text[seq.request_id].push(token)
            reason = "stop" if stopped else None
        if reason is None and len(seq.output_ids) >= params.max_new_tokens:
            reason = "length"
        if reason in ("eos", "length") or (reason == "stop" and token in params.stop_token_ids):
            tail, stopped = self._text[seq.request_id].close()
            text += tail
            reason = "stop" if stopped else reason
        if reason is not None:
            self._drop(seq, reason)
        return StepOutput(seq.request_id, [token], text, reason, len(seq.prompt_ids), len(seq.output_ids))

    def _drop(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq.request_id)
        self._seqs.pop(seq.request_id, None)
        self._text.pop(seq.request_id, None)

    def generate(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion (continuous batching when they outnumber the slots)."""
        order, prompts, tokens, texts, reasons = [], {}, {}, {}, {}
        for request in requests:
            rid = self.add(request)
            order.append(rid)
            prompts[rid], tokens[rid], texts[rid] = self._seqs[rid].prompt_ids, [], []
        while self.scheduler.has_work():
            for out in self.step():
                tokens[out.request_id] += out.token_ids
                texts[out.request_id].append(out.text)
                if out.finish_reason:
                    reasons[out.request_id] = out.finish_reason
        return [GenerationResult(r, prompts[r], tokens[r], "".join(texts[r]), reasons[r]) for r in order]
