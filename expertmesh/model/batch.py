"""The shape of one forward step: which sequences run, where in their KV cache, how many tokens each.

A step holds B sequences with q_len[b] new tokens each (a whole prompt at prefill, one token at
decode; both kinds share a step under continuous batching). Tokens travel flat, sequence-major,
without padding: T = sum(q_len). Attention needs a padded [B, Qmax] view of the queries and a
[B, Kmax] view of the cache; the index tensors for both are computed here once per step and shared
by every layer. The padded rows are in slot order, so that when the step's slots are 0..B-1 in any
order (every slot busy, as under full load) the cache is sliced in place rather than gathered.

Legend: B = sequences in the step, T = tokens in the step, Qmax = longest q_len, Kmax = longest
cache length after the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    slots: torch.Tensor  # [B] KV-cache slot of each padded row (ascending)
    start: torch.Tensor  # [B] tokens already in the cache (position of the first new token), per sequence
    q_lens: list[int]  # [B] new tokens per sequence
    positions: torch.Tensor  # [T] absolute position of each token
    token_slots: torch.Tensor  # [T] slot of each token's sequence
    pad_index: torch.Tensor  # [B, Qmax] flat token index for each padded query (pads point at 0)
    unpad_index: torch.Tensor  # [T] row of each token in the flattened [B * Qmax] padded view
    last_index: torch.Tensor  # [B] flat index of each sequence's last token
    kv_max: int  # Kmax
    mask: torch.Tensor | None  # [B, 1, Qmax, Kmax] per padded row, True = may attend; None = all Kmax keys
    contiguous_slots: bool  # the rows' slots are exactly 0..B-1, so the cache can be sliced, not gathered

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def q_max(self) -> int:
        return int(self.pad_index.shape[1])

    @classmethod
    def build(cls, slots: Sequence[int], start: Sequence[int], q_lens: Sequence[int],
              sliding_window: int | None = None, device: str | torch.device = "cpu") -> StepBatch:
        """Index tensors for a step. Plain lists in, so schedulers and wire formats stay torch-free."""
        assert len(slots) == len(start) == len(q_lens) and len(slots) > 0
        assert all(q > 0 for q in q_lens) and all(s >= 0 for s in start)
        b, q_max = len(slots), max(q_lens)
        starts = torch.tensor(start, dtype=torch.long)
        lens = torch.tensor(q_lens, dtype=torch.long)
        seq_of_token = torch.repeat_interleave(torch.arange(b), lens)  # [T]
        first_token = torch.cumsum(lens, 0) - lens  # [B] flat index of each sequence's first token
        offset_in_seq = torch.arange(int(lens.sum())) - first_token[seq_of_token]  # [T]
        positions = starts[seq_of_token] + offset_in_seq
        # Padded row r holds sequence order[r]: rows ascend by slot.
        order = torch.tensor(sorted(range(b), key=slots.__getitem__), dtype=torch.long)
        row_of_seq = torch.empty_like(order)
        row_of_seq[order] = torch.arange(b)
        q_idx = torch.arange(q_max)
        valid = q_idx[None, :] < lens[order, None]  # [B, Qmax]
        pad_index = torch.where(valid, first_token[order, None] + q_idx[None, :], 0)
        unpad_index = row_of_seq[seq_of_token] * q_max + offset_in_seq
        kv_lens = starts + lens
        kv_max = int(kv_lens.max())
        mask = None
        uniform = bool((kv_lens == kv_max).all()) and q_max == 1
        if not uniform or sliding_window is not None:
            mask = _attention_mask(starts[order], lens[order], valid, kv_max, sliding_window)
        slots_t = torch.tensor(slots, dtype=torch.long)
        index = _to_device([slots_t[order], starts, positions, slots_t[seq_of_token], pad_index, unpad_index,
                            first_token + lens - 1], device)
        return cls(
            slots=index[0], start=index[1], q_lens=list(q_lens), positions=index[2], token_slots=index[3],
            pad_index=index[4], unpad_index=index[5], last_index=index[6], kv_max=kv_max,
            mask=None if mask is None else mask.to(device),
            contiguous_slots=sorted(slots) == list(range(b)),
        )


def _to_device(tensors: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor]:
    """Same-dtype tensors moved in one copy (on a GPU, one transfer per step instead of one each)."""
    if torch.device(device).type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _attention_mask(starts: torch.Tensor, lens: torch.Tensor, valid: torch.Tensor, kv_max: int,
                    sliding_window: int | None) -> torch.Tensor:
    """Causal (optionally sliding-window) mask over the padded step, [B, 1, Qmax, Kmax]."""
    q_max = valid.shape[1]
    q_pos = starts[:, None] + torch.arange(q_max)[None, :]  # [B, Qmax] absolute query positions
    k_pos = torch.arange(kv_max)  # [Kmax]
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Qmax, Kmax]
    if sliding_window is not None:
        # As Hugging Face's sliding-window mask: a query sees itself and the window-1 keys before it.
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    # Padded query rows would see no key and turn into NaN; let them see key 0 (results are dropped).
    mask[:, :, 0] |= ~valid
    return mask[:, None]  # [B, 1, Qmax, Kmax]
