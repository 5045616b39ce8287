"""Next-token sampling: per-request parameters and the maths that turns logits into token ids.

Each request brings its own `SamplingParams` and, when it samples, its own `torch.Generator`
made once by `make_generator` and kept for the request's lifetime. The contract that makes
seeded output reproducible under continuous batching:

    the token drawn for row b depends only on logits[b], params[b] and the state of generators[b],
    never on which other requests share the batch or in what order.

That is why sampled rows are drawn one at a time, each with its own generator, while greedy rows
(the common case, and the one that needs no randomness) go through one vectorised argmax.

Order of operations for a sampled row follows the usual convention (Hugging Face `generate`,
vLLM): logits / temperature → top-k → top-p (nucleus, Holtzman et al. 2019,
https://arxiv.org/abs/1904.09751) → softmax → multinomial.

Shapes: B = batch rows (one per request), V = vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# torch.Generator.manual_seed accepts 64-bit seeds; we keep to the signed range so seeds survive
# int64 fields (protobuf, numpy) unchanged.
_MAX_SEED = 2**63

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily, their limit (as vLLM does): logits / 1e-38 overflow
float32 to inf, whose softmax is NaN."""

MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
"""Bounds on `stop`: matching holds every proper prefix of every stop string, which grows with the
square of its length (a 1 MB stop string would need hundreds of GB)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its next tokens and when it stops.

    The defaults give greedy decoding of up to 16 tokens, stopping at end-of-sequence.
    """

    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy (argmax); higher flattens the distribution
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the most likely tokens covering this much probability; 1 = off
    seed: int | None = None  # seeds this request's generator, making sampled output reproducible
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings; the first occurrence ends the completion, unemitted
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the completion like EOS does
    ignore_eos: bool = False  # keep generating past EOS (benchmarks that need fixed lengths)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError, naming the offending field first, if these parameters are unusable.

        `vocab_size`, when given, also bounds `stop_token_ids`.
        """
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        # `not (0 < p <= 1)` is also true for NaN, which a plain `p <= 0 or p > 1` would let through.
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed: must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        # A bare string would be iterated as one stop string per character.
        if isinstance(self.stop, str):
            raise ValueError(f"stop: must be a sequence of strings, not a single string: {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop: a stop string has at most {MAX_STOP_CHARS} characters, got one of {len(s)}")
        for t in self.stop_token_ids:
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                bound = "" if vocab_size is None else f", {vocab_size}"
                raise ValueError(f"stop_token_ids: must be in [0{bound}), got {t}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax and no randomness is involved."""
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The random generator for one request, to be kept and reused for all its steps.

    None for greedy requests (they draw nothing). A request without a seed still gets its own
    generator, seeded from OS entropy, so it never perturbs the global RNG or other requests.
    The generator must live on the device the logits are sampled on.
    """
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The float32 distribution [V] that a sampled row with these params draws from.

    Tokens removed by top-k / top-p have probability exactly 0; the rest are renormalised.
    Not meaningful for greedy params (temperature 0).
    """
    assert logits.dim() == 1, f"expected one row of logits [V], got shape {tuple(logits.shape)}"
    assert not params.greedy, "greedy rows take the argmax; they have no sampling distribution"
    x = logits.float() / params.temperature  # [V]
    vocab = x.shape[0]
    if 0 < params.top_k < vocab:
        # Keep everything tied with the k-th best value: the kept set then depends only on the
        # values, not on how topk happens to order ties on a given device.
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [V]
    if params.top_p < 1.0:
        # Stable sort so that among equal probabilities the lowest id comes first, as with argmax.
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)  # [V], [V]
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep a token while the mass of the tokens before it is still short of top_p: that is the
        # smallest prefix whose mass reaches top_p. The first token is always kept.
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
        keep_sorted[1:] = cumulative[:-1] < params.top_p
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Choose the next token for each row of `logits` [B, V]; returns int64 ids [B].

    Row b uses params[b] and generators[b] (from `make_generator`; None with temperature > 0
    falls back to torch's global RNG, which is not reproducible under batching). Greedy rows take
    the argmax, ties going to the lowest id. Any float dtype is accepted; maths is float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    if len(params) != rows or len(generators) != rows:
        raise ValueError(
            f"params and generators need one entry per row: {rows} rows, "
            f"{len(params)} params, {len(generators)} generators"
        )
    greedy_rows = [b for b in range(rows) if params[b].greedy]
    if len(greedy_rows) == rows:  # the common all-greedy batch needs no gather/scatter
        return logits.float().argmax(dim=-1)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)  # [B]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, dtype=torch.int64, device=logits.device)
        out[idx] = logits[idx].float().argmax(dim=-1)
    # One draw per row with that row's own generator: batching several rows into one multinomial
    # call would make each row's draw depend on its neighbours.
    for b in range(rows):
        if not params[b].greedy:
            probs = next_token_probs(logits[b], params[b])  # [V]
            out[b] = torch.multinomial(probs, 1, generator=generators[b])[0]
    return out


class Sampler:
    """Samples for many requests over their lifetimes, keeping each request's generator.

    Lives wherever logits are made (the engine's process, or the cluster's last attention shard).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.generators: dict[str, torch.Generator | None] = {}

    def __call__(self, logits: torch.Tensor, request_ids: Sequence[str],
                 params: Sequence[SamplingParams]) -> list[int]:
        """logits: [B, V] -> next id of each row; row b belongs to request_ids[b]."""
        gens = []
        for rid, p in zip(request_ids, params):
            if rid not in self.generators:
                self.generators[rid] = make_generator(p, self.device)
            gens.append(self.generators[rid])
        return sample(logits, params, gens).tolist()

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
