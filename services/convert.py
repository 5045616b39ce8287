"""Sampling parameters between the engine and protobuf, for the public API and the internal step calls.

The public `SamplingParams` message is reused inside the cluster (the last attention shard samples),
so there is one conversion each way.
"""

from __future__ import annotations

from expertmesh.sampling import SamplingParams
from expertmesh.v1 import generate_pb2


def sampling_from_pb(pb: generate_pb2.SamplingParams) -> SamplingParams:
    """Proto sampling parameters -> engine ones. Proto top_p 0 or 1 means off (engine 1.0); an
    unset max_new_tokens is 0 and is rejected by validation, as the contract says."""
    if not 0.0 <= pb.top_p <= 1.0:  # also false for NaN
        raise ValueError(f"top_p: must be in [0, 1] (0 or 1 = off), got {pb.top_p}")
    return SamplingParams(
        temperature=pb.temperature, top_k=pb.top_k, top_p=pb.top_p if 0.0 < pb.top_p < 1.0 else 1.0,
        seed=pb.seed if pb.HasField("seed") else None, max_new_tokens=pb.max_new_tokens, stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids), ignore_eos=pb.ignore_eos)


def sampling_to_pb(p: SamplingParams) -> generate_pb2.SamplingParams:
    pb = generate_pb2.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                     max_new_tokens=p.max_new_tokens, stop=list(p.stop),
                                     stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)
    if p.seed is not None:
        pb.seed = p.seed
    return pb
