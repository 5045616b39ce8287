"""Continuous batching, in plain Python (no torch): which sequences run in the next step.

Each step every running sequence advances: one that still has uncached tokens (its prompt, or tokens to
re-prefill) runs as many of them as the token budget allows; one that is decoding runs its last token.
Waiting sequences join between steps while a KV-cache slot and token budget are free; finished ones
leave and free their slot at once. Sequences at different positions share a step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from expertmesh.sampling import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later (RESOURCE_EXHAUSTED)."""


class CacheLostError(RuntimeError):
    """A step runner lost (part of) the KV cache, e.g. an attention shard was restarted: every running
    sequence must be prefilled again from its prompt and the tokens generated so far."""


@dataclass(eq=False)
class Sequence:
    """One request's generation state. `num_cached` counts its tokens already in the KV cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0
    finish_reason: str | None = None  # "length" | "eos" | "stop" | "abort"

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def max_len(self) -> int:
        """Cache positions this sequence may need: the prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(frozen=True)
class StepPlan:
    """One forward step: per sequence, its cache slot, cache position and the tokens it runs."""

    seqs: list[Sequence]
    starts: list[int]  # cache position of each sequence's first token in this step
    q_lens: list[int]  # tokens each sequence runs in this step
    token_ids: list[int]  # flat, sequence-major: T = sum(q_lens)
    sample: list[bool]  # whether the step reaches the end of the sequence's known tokens (sample a token)

    @property
    def slots(self) -> list[int]:
        return [s.slot for s in self.seqs]


class Scheduler:
    """Admits waiting sequences into free slots and plans each step within a token budget."""

    def __init__(self, num_slots: int, max_len: int, max_tokens_per_step: int = 4096, max_waiting: int = 1024):
        if max_tokens_per_step < num_slots:
            raise ValueError("max_tokens_per_step must be at least the number of slots (one decode token each)")
        self.max_len, self.max_tokens_per_step, self.max_waiting = max_len, max_tokens_per_step, max_waiting
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.num_slots = num_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if seq.max_len() > self.max_len:
            raise ValueError(f"max_new_tokens: prompt ({len(seq.prompt_ids)} tokens) + max_new_tokens "
                             f"({seq.params.max_new_tokens}) exceeds the context of {self.max_len} tokens")
        if len(self.waiting) - len(self.free_slots) >= self.max_waiting:  # free slots take arrivals at once
            raise QueueFullError(f"{len(self.waiting)} requests already waiting (limit {self.max_waiting})")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cache_used_ratio(self) -> float:
        """Share of the cache's token positions held by running sequences."""
        return sum(s.num_cached for s in self.running) / (self.num_slots * self.max_len)

    def schedule(self) -> StepPlan | None:
        """Admit what fits, then plan one step for every running sequence; None when idle."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
        if not self.running:
            return None
        # Decoding sequences first: each needs one token; what is left of the budget goes to prefill.
        budget = self.max_tokens_per_step - sum(1 for s in self.running if s.num_tokens - s.num_cached == 1)
        seqs, starts, q_lens, token_ids, sample = [], [], [], [], []
        for seq in self.running:
            pending = seq.num_tokens - seq.num_cached
            n = 1 if pending == 1 else min(pending, budget)
            if n <= 0:
                continue  # no budget left this step; it prefills next step
            if pending > 1:
                budget -= n
            seqs.append(seq)
            starts.append(seq.num_cached)
            q_lens.append(n)
            token_ids.extend(seq.all_ids[seq.num_cached : seq.num_cached + n])
            sample.append(n == pending)
        return StepPlan(seqs, starts, q_lens, token_ids, sample)

    def recompute(self) -> None:
        """Forget what the cache holds: every running sequence re-prefills its tokens (prompt and output
        so far) in the next steps, then samples its next token as if nothing had happened."""
        for seq in self.running:
            seq.num_cached = 0

    def complete(self, plan: StepPlan) -> None:
        """Record that the plan's tokens are now in the cache."""
        for seq, n in zip(plan.seqs, plan.q_lens):
            seq.num_cached += n

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its slot at once."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None
