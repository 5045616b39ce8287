"""Placement planning, pure: how a model is cut into attention shards and expert groups, and what
each asks Ray for.

Attention shards own contiguous layer ranges (the first embeds tokens, the last owns the LM head);
expert groups own expert ids across every layer (expert parallelism). With CUDA each component asks
for its own GPU share (`num_gpus`, fractions allowed); on CPU it asks for none. Optional custom
resources ("attention", "expert" node labels) pin each kind to its node pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from expertmesh.checkpoint import split_range
from expertmesh.model.config import ModelConfig


@dataclass(frozen=True)
class ComponentPlan:
    """One Ray actor to start: what it owns and the resources it requests."""

    name: str
    layers: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()
    group: int = 0  # expert groups: which group, and which of its replicas
    replica: int = 0
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterPlan:
    shards: tuple[ComponentPlan, ...]
    groups: tuple[ComponentPlan, ...]  # every replica of every expert group, group-major


def plan_cluster(cfg: ModelConfig, attention_shards: int = 1, expert_groups: int = 1, device: str = "cpu",
                 gpus_per_shard: float | None = None, gpus_per_group: float | None = None, num_cpus: float = 0.0,
                 attention_resource: str | None = None, expert_resource: str | None = None,
                 expert_replicas: int = 1) -> ClusterPlan:
    """The actors of a cluster for `cfg`.

    GPU shares default to one whole GPU per component with device "cuda" and none on CPU; given
    explicitly they are requested from Ray whatever the device (a CPU test cluster can declare GPUs
    to exercise placement). `num_cpus` is what each actor reserves (0: actors share the node's cores).
    `expert_replicas` copies of each expert group run as separate actors (each with its own GPU share).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    default = 1.0 if device == "cuda" else 0.0
    gpus_per_shard = default if gpus_per_shard is None else gpus_per_shard
    gpus_per_group = default if gpus_per_group is None else gpus_per_group
    for name, share in (("gpus_per_shard", gpus_per_shard), ("gpus_per_group", gpus_per_group)):
        if not 0 <= share <= 8 or (device == "cuda" and share == 0):
            raise ValueError(f"{name} must be in {'(0' if device == 'cuda' else '[0'}, 8], got {share}")
        if share > 1 and share != int(share):  # Ray hands out GPUs by id: a share is a part of one, or whole ones
            raise ValueError(f"{name} above 1 must be a whole number of GPUs, got {share}")
    if expert_replicas < 1:
        raise ValueError(f"expert_replicas must be >= 1, got {expert_replicas}")
    if num_cpus < 0:
        raise ValueError(f"num_cpus must be >= 0, got {num_cpus}")
    shards = tuple(
        ComponentPlan(f"attention-{k}", layers=layers, num_gpus=gpus_per_shard, num_cpus=num_cpus,
                      resources={attention_resource: 0.001} if attention_resource else {})
        for k, layers in enumerate(split_range(cfg.num_hidden_layers, attention_shards, "attention_shards")))
    groups = tuple(
        ComponentPlan(f"experts-{g}" + (f"-replica-{r}" if expert_replicas > 1 else ""), experts=experts, group=g,
                      replica=r, num_gpus=gpus_per_group, num_cpus=num_cpus,
                      resources={expert_resource: 0.001} if expert_resource else {})
        for g, experts in enumerate(split_range(cfg.num_local_experts, expert_groups, "expert_groups"))
        for r in range(expert_replicas))
    return ClusterPlan(shards, groups)


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's resources in all, from the connected Ray."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def requests(c: ComponentPlan) -> dict[str, float]:
    """What one actor asks Ray for, by resource ("GPU", "CPU", custom), leaving out what is 0."""
    return {name: amount for name, amount in (("GPU", c.num_gpus), ("CPU", c.num_cpus), *c.resources.items())
            if amount}


def demand(plan: ClusterPlan) -> dict[str, float]:
    """What the plan's actors ask Ray for, in all, by resource. Routers ask for nothing and are not
    counted."""
    total: dict[str, float] = {}
    for c in (*plan.shards, *plan.groups):
        for name, amount in requests(c).items():
            total[name] = total.get(name, 0.0) + amount
    return total


_FLAGS = {"GPU": "--gpus-per-shard and --gpus-per-group (fractions share a GPU)",
          "CPU": "the CPUs each component reserves"}


def _flags(name: str) -> str:
    return _FLAGS.get(name, "--attention-resource / --expert-resource, a resource no node advertises")


def _asks(c: ComponentPlan) -> str:
    return f"{c.name} ({', '.join(f'{name} {amount:g}' for name, amount in requests(c).items())})"


def shortfall(plan: ClusterPlan, available: Mapping[str, float],
              nodes: Sequence[Mapping[str, float]] | None = None) -> str | None:
    """Why a cluster with `available` resources in all (`ray.cluster_resources()`) can never place
    every actor of `plan`, naming the flags that set each demand; None if nothing rules it out.
    With `nodes` (each alive node's resources), also a component that no single node could hold even
    empty (see `_Node` for how Ray counts a node's GPUs)."""
    short = [(name, need, available.get(name, 0.0)) for name, need in sorted(demand(plan).items())
             if need > available.get(name, 0.0) + 1e-6]
    if short:
        parts = [f"{name} {need:g} (the cluster has {have:g}; set by {_flags(name)})" for name, need, have in short]
        return "Ray cannot place every component: they ask for " + "; ".join(parts)
    if nodes is None:
        return None
    homeless = [c for c in (*plan.shards, *plan.groups) if not any(_Node(n).take(c) for n in nodes)]
    if not homeless:
        return None
    names = sorted({name for c in homeless for name in requests(c)})
    return ("Ray cannot place every component: no single node has what " + ", ".join(map(_asks, homeless[:3]))
            + (f" and {len(homeless) - 3} more" if len(homeless) > 3 else "") + " asks for (set by "
            + "; ".join(_flags(name) for name in names) + ")")


def unpacked(plan: ClusterPlan, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why a greedy placement of `plan` on `nodes`, empty (largest GPU share first, each component on
    the first node where it fits, inside the fullest GPU that has room), does not complete; None if it
    does. Ray, too, keeps each fractional share inside one GPU, so this is what will most likely keep
    actors pending, e.g. three 0.6 shares on two GPUs. Greedy can miss a placement only in contrived cases:
    take it as what to change, not as proof."""
    free = [_Node(n) for n in nodes]
    placed = 0
    for c in sorted((*plan.shards, *plan.groups), key=lambda c: -c.num_gpus):
        if not any(node.take(c) for node in free):
            return (f"Ray will most likely not place every component on its {len(free)} node(s): with {placed} "
                    f"placed, {_asks(c)} fits on none (GPU shares left per node: {[n.gpus_free() for n in free]}); "
                    f"set by {_flags('GPU')}")
        placed += 1
    return None


class _Node:
    """What is left of one node while placing components on it, counted as Ray does: a GPU share up
    to 1 inside one GPU (two 0.6 shares need two GPUs), a larger one as whole GPUs; CPUs and
    node-pool resources from the node's totals."""

    def __init__(self, resources: Mapping[str, float]):
        self.gpus = [1.0] * int(resources.get("GPU", 0.0) + 1e-6)
        self.other = {k: v for k, v in resources.items() if k != "GPU"}

    def gpus_free(self) -> list[float]:
        return [round(g, 4) for g in self.gpus]

    def take(self, c: ComponentPlan) -> bool:
        """Place `c` here if it fits; whether it did."""
        needs = requests(c)
        share = needs.pop("GPU", 0.0)
        if any(amount > self.other.get(name, 0.0) + 1e-6 for name, amount in needs.items()):
            return False
        if share > 1:
            whole = [i for i, g in enumerate(self.gpus) if g >= 1.0 - 1e-6][:int(share)]
            if len(whole) < share:
                return False
            for i in whole:
                self.gpus[i] = 0.0
        elif share > 0:
            fits = [i for i, g in enumerate(self.gpus) if g >= share - 1e-6]
            if not fits:
                return False
            self.gpus[min(fits, key=lambda i: self.gpus[i])] -= share  # the fullest GPU it fits on
        for name, amount in needs.items():
            self.other[name] -= amount
        return True
