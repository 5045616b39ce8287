"""The expert side of a Mixtral layer: router gate, dispatch to expert groups, SwiGLU experts, combine.

Two seams keep the processes of the cluster apart:

* `MoE` — what the attention side calls: a layer's normalised hidden states in, the MoE output out.
  In one process it is a `Router` over local groups; in the cluster it is a client of the router service.
* `Experts` — what the router calls: rows of hidden states, each with the one expert it goes to,
  for the experts one group owns. Locally an `ExpertGroup`; in the cluster a client of an expert service.

Routing follows Mixtral: softmax of the gate logits in fp32, top-k, renormalise over the k.
Legend: T = tokens, D = hidden, E = experts, A = experts per token (top-k), N = rows sent to a group,
I = expert hidden size.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from expertmesh.model.linear import Linear


class MoE(Protocol):
    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] normalised hidden states of one layer -> [T, D] MoE output."""
        ...


class Pending(Protocol):
    def result(self) -> torch.Tensor: ...


class Experts(Protocol):
    experts: tuple[int, ...]

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> Pending:
        """Start x: [N, D] rows sorted by expert, expert_ids: [N] through their experts; `.result()`
        is [N, D]. Submitting to every group before waiting on any lets remote groups run concurrently."""
        ...


class Done:
    """An already computed result (local experts run when submitted)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing. x: [T, D], gate: [E, D] -> (weights [T, A] fp32, experts [T, A] int64)."""
    probs = torch.softmax(F.linear(x, gate).float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, A]
    return weights / weights.sum(dim=-1, keepdim=True), experts


@dataclass(frozen=True)
class Dispatch:
    """Which rows go to which group. Rows are (token, choice) pairs of the flattened [T*A] routing."""

    order: torch.Tensor  # [T*A] every row: by group, within a group by expert, then token
    sizes: list[int]  # rows of each group: `order` split by these is each group's batch
    tokens: torch.Tensor  # [T*A] token of each row
    experts: torch.Tensor  # [T*A] expert of each row
    weights: torch.Tensor  # [T*A] fp32 routing weight of each row

    @property
    def rows(self) -> list[torch.Tensor]:
        """Per group, its rows: [N_g] indices into T*A (views of `order`)."""
        return list(self.order.split(self.sizes))

    @functools.cached_property
    def row_tokens(self) -> torch.Tensor:
        """[T*A] token of each row in `order`: where the dispatch gathers it from and the combine adds it
        back (one gather for both)."""
        return self.tokens[self.order]


def plan_dispatch(weights: torch.Tensor, experts: torch.Tensor, group_of_expert: torch.Tensor,
                  num_groups: int) -> Dispatch:
    """Split routed rows by expert group; each group gets one batch, ordered by expert."""
    t, a = experts.shape
    flat_experts = experts.reshape(-1)  # [T*A]
    tokens = torch.arange(t, device=experts.device).repeat_interleave(a)  # [T*A]
    # Stable sorts, so rows of one expert keep token order (as the reference does).
    if num_groups == 1:  # no group key, and on a GPU no wait for the sizes
        order, sizes = torch.sort(flat_experts, stable=True).indices, [t * a]
    else:  # one sort by (group, expert): every group's rows are one slice
        groups = group_of_expert[flat_experts]
        order = torch.sort(groups * group_of_expert.numel() + flat_experts, stable=True).indices
        sizes = torch.bincount(groups, minlength=num_groups).tolist()
    return Dispatch(order=order, sizes=sizes, tokens=tokens, experts=flat_experts, weights=weights.reshape(-1))


HOST_PLAN_ROWS = 16
"""Up to this many routed rows (tokens x top-k) are planned on the host in plain Python: a decode
step at low load. The tensor plan costs about 20 small ops whatever the size; this one, a handful."""


def plan_dispatch_small(weights: torch.Tensor, experts: torch.Tensor, group_of_expert: Sequence[int],
                        num_groups: int) -> Dispatch:
    """`plan_dispatch` for a few rows, the same plan: rows by group, within a group by expert then
    token (a stable sort, as the reference's)."""
    t, a = experts.shape
    flat = experts.reshape(-1)
    ids = flat.tolist()
    by_group: list[list[int]] = [[] for _ in range(num_groups)]
    for i in sorted(range(t * a), key=ids.__getitem__):
        by_group[group_of_expert[ids[i]]].append(i)
    return Dispatch(order=torch.tensor(list(itertools.chain.from_iterable(by_group)), dtype=torch.long,
                                       device=experts.device),
                    sizes=[len(r) for r in by_group],
                    tokens=torch.tensor([i // a for i in range(t * a)], device=experts.device), experts=flat,
                    weights=weights.reshape(-1))


@dataclass(frozen=True)
class Returns:
    """Where the groups' output rows go back: for their rows concatenated in group order, each row's
    token and routing weight. Computable while the groups work, so that only `combine` waits on them."""

    tokens: torch.Tensor  # [N] token of each row
    weights: torch.Tensor  # [N, 1] fp32 routing weight of each row

    def split(self, sizes: Sequence[int]) -> list[Returns]:
        """Per group (`Dispatch.sizes`), where its rows go back."""
        return [Returns(t, w) for t, w in zip(self.tokens.split(sizes), self.weights.split(sizes))]


def returns(dispatch: Dispatch) -> Returns:
    return Returns(tokens=dispatch.row_tokens, weights=dispatch.weights[dispatch.order, None])


ANY_ORDER_TOP_K = 2
"""With at most this many experts per token, the groups' rows may be added in any order with the same
bits: from zero, a token's (0 + a) + b and (0 + b) + a are both a + b. A remote router then adds each
group's rows as they arrive (`add_rows`), and only the last group's wait for the last reply."""


def add_rows(out: torch.Tensor, y: torch.Tensor, back: Returns) -> None:
    """Add rows y: [N, D] into out: [T, D], each scaled in fp32 by its weight and cast first (as the
    reference), a token's rows in row order."""
    out.index_add_(0, back.tokens, (y * back.weights).to(out.dtype))


def combine(dispatch: Dispatch, outputs: Sequence[torch.Tensor | None], like: torch.Tensor,
            back: Returns | None = None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs -> [T, D]. `outputs[g]` is None for a group
    without rows; `back` is `returns(dispatch)` if already computed.

    As the reference: each contribution is scaled in fp32, cast to the compute dtype, then added,
    a token's contributions in group order and within a group in expert order (one index_add_ over
    every row adds them in row order).
    """
    ys = [y for y in outputs if y is not None]
    if not ys:
        return torch.zeros_like(like)
    out = torch.zeros_like(like)
    add_rows(out, ys[0] if len(ys) == 1 else torch.cat(ys), back or returns(dispatch))
    return out


class ExpertGroup:
    """Local SwiGLU experts of one group, for every layer it serves: w2(silu(w1 x) * w3 x).

    Per layer and owned expert: w13 [2I, D] (w1 then w3, so one matmul computes the gate and up
    projections together) and w2 [D, I].
    """

    def __init__(self, experts: Sequence[int], w13: Mapping[int, Sequence[Linear]],
                 w2: Mapping[int, Sequence[Linear]]):
        self.experts = tuple(experts)
        self.w13, self.w2 = dict(w13), dict(w2)
        self._local = {e: i for i, e in enumerate(self.experts)}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.w13))

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> Done:
        return Done(self(layer, x, expert_ids))

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if layer not in self.w13:
            raise ValueError(f"layer: {layer} is not served by this expert group")
        runs = _runs(expert_ids)
        for expert, _ in runs:
            if expert not in self._local:
                raise ValueError(f"expert_ids: expert {expert} is not owned by this group (owns {self.experts})")
        if len(runs) == 1:  # every row to one expert (a decode step at low load): no output buffer
            return self._expert(layer, runs[0][0], x)
        out = torch.empty_like(x)
        begin = 0
        for expert, count in runs:
            out[begin:begin + count] = self._expert(layer, expert, x[begin:begin + count])
            begin += count
        return out

    def _expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        e = self._local[expert]
        gate, up = self.w13[layer][e](x).chunk(2, dim=-1)  # [n, I] each
        return self.w2[layer][e](F.silu(gate) * up)


HOST_RUN_ROWS = 64
"""Up to this many rows, the runs of equal expert ids are found in plain Python (a few us, against
about 17 us for unique_consecutive and its copies)."""


def _runs(expert_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(expert, rows)] of each run of equal ids, found on the host: one copy from a GPU instead of a
    wait per value read."""
    if expert_ids.numel() <= HOST_RUN_ROWS:
        return [(e, len(list(run))) for e, run in itertools.groupby(expert_ids.tolist())]
    ids, counts = torch.unique_consecutive(expert_ids.cpu(), return_counts=True)
    return list(zip(ids.tolist(), counts.tolist()))


class Router:
    """Owns each layer's gate; sends every group one batch of the rows it owns; combines the results."""

    def __init__(self, gates: Mapping[int, torch.Tensor], top_k: int, groups: Sequence[Experts],
                 num_experts: int, observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None):
        """`observe(layer, experts [T, A], weights [T, A])`, if given, sees every routing decision
        (the metrics hook; the model itself knows nothing of Prometheus)."""
        self.gates, self.top_k, self.groups, self.observe = dict(gates), top_k, list(groups), observe
        group_of_expert = torch.full((num_experts,), -1, dtype=torch.long)
        for g, group in enumerate(self.groups):
            group_of_expert[list(group.experts)] = g
        if (group_of_expert < 0).any():
            missing = (group_of_expert < 0).nonzero().flatten().tolist()
            raise ValueError(f"experts {missing} are owned by no expert group")
        # On the gates' device, so the per-layer dispatch never copies it across devices.
        self.group_of_expert = group_of_expert.to(next(iter(self.gates.values())).device)
        self._group_of_expert = group_of_expert.tolist()

    def dispatch(self, layer: int, x: torch.Tensor) -> tuple[Dispatch, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Route x: [T, D] of `layer`; per group, its rows and their expert ids (None: no rows).
        The caller reports the decision (`report`) once the groups' work is on its way."""
        weights, experts = route(x, self.gates[layer], self.top_k)
        if experts.numel() <= HOST_PLAN_ROWS:
            plan = plan_dispatch_small(weights, experts, self._group_of_expert, len(self.groups))
        else:
            plan = plan_dispatch(weights, experts, self.group_of_expert, len(self.groups))
        xs, ids = x[plan.row_tokens], plan.experts[plan.order]  # one gather; each group's rows a slice
        return plan, [(xg, eg) if n else None for xg, eg, n in zip(xs.split(plan.sizes), ids.split(plan.sizes),
                                                                     plan.sizes)]

    def report(self, layer: int, plan: Dispatch) -> None:
        """Show one layer's routing decision to `observe`, if any."""
        if self.observe is not None:
            self.observe(layer, plan.experts.view(-1, self.top_k), plan.weights.view(-1, self.top_k))

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        plan, work = self.dispatch(layer, x)
        pending = [group.submit(layer, *w) if w else None for group, w in zip(self.groups, work)]  # all start first
        self.report(layer, plan)
        return combine(plan, [p.result() if p else None for p in pending], x)
