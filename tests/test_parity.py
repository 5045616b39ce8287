"""The engine against `transformers.MixtralForCausalLM` on the same weights.

fp32: logits within 1e-4 for the prefill and 32 decode steps of a batch of prompts of different
lengths, run together in one batch on our side; greedy tokens identical; prefill + incremental decode
equal to one forward pass over the whole sequence.

bf16: see `test_bf16_matches_reference_as_closely_as_reference_matches_fp32`.
"""

from __future__ import annotations

import random

import pytest
import torch

from expertmesh.checkpoint import CheckpointReader
from expertmesh.model.batch import StepBatch
from expertmesh.model.load import load_local_model
from reference import load_reference, reference_greedy

pytest.importorskip("transformers")

STEPS = 32
ATOL = 1e-4


def make_prompts(lengths, seed=0, vocab=32000):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in lengths]


def our_greedy(stack, prompts, steps, slots=None):
    """Prefill all prompts in one step, then decode them together; sequences sit at different positions."""
    slots = list(range(len(prompts))) if slots is None else slots
    window, device = stack.cfg.sliding_window, stack.device
    batch = StepBatch.build(slots, [0] * len(prompts), [len(p) for p in prompts], window, device)
    logits = [stack.forward(batch, torch.tensor(sum(prompts, []), device=device))]  # [B, V]
    tokens = [logits[-1].argmax(-1)]
    for step in range(1, steps):
        starts = [len(p) + step - 1 for p in prompts]
        batch = StepBatch.build(slots, starts, [1] * len(prompts), window, device)
        logits.append(stack.forward(batch, tokens[-1]))
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1).tolist(), torch.stack(logits, 1).cpu()  # [B, steps], [B, steps, V]


@pytest.mark.parametrize("ckpt_name", ["tiny_ckpt", "sharded_ckpt", "hf_ckpt"])
def test_fp32_logits_and_greedy_tokens_match_reference(ckpt_name, request):
    ckpt = request.getfixturevalue(ckpt_name)
    reader = CheckpointReader(ckpt)
    stack = load_local_model(reader, num_slots=5, max_len=128, dtype=torch.float32)
    prompts = make_prompts([7, 1, 19, 4, 30], seed=len(ckpt_name))
    tokens, logits = our_greedy(stack, prompts, STEPS)
    ref = load_reference(ckpt)
    for b, prompt in enumerate(prompts):
        ref_tokens, ref_logits = reference_greedy(ref, prompt, STEPS)
        assert tokens[b] == ref_tokens, f"prompt {b}: greedy tokens differ"
        err = (logits[b] - ref_logits).abs().max().item()
        assert err < ATOL, f"prompt {b}: max |logit difference| {err:.2e}"


def test_incremental_decode_equals_full_forward(tiny_ckpt):
    stack = load_local_model(CheckpointReader(tiny_ckpt), num_slots=3, max_len=128, dtype=torch.float32)
    prompts = make_prompts([5, 12, 2], seed=7)
    tokens, step_logits = our_greedy(stack, prompts, 16)
    full = [p + t for p, t in zip(prompts, tokens)]
    batch = StepBatch.build([0, 1, 2], [0, 0, 0], [len(s) for s in full])
    all_logits = stack.forward(batch, torch.tensor(sum(full, [])), all_logits=True)  # [T, V]
    begin = 0
    for b, seq in enumerate(full):
        # position len(prompt)-1 predicted the first generated token, and so on
        rows = all_logits[begin + len(prompts[b]) - 1 : begin + len(seq) - 1]
        assert (rows - step_logits[b]).abs().max().item() < ATOL
        begin += len(seq)


@pytest.mark.parametrize("slots", [[3, 0, 4, 1, 2], [6, 1, 4, 0, 2]], ids=["every slot, shuffled", "some slots"])
def test_any_slot_assignment_gives_the_same_logits(tiny_ckpt, slots):
    """Sequences in any slots, in any order: the same logits as in slots 0..B-1. The padded view
    is in slot order, so a shuffled full set of slots is sliced in place and a subset gathered."""
    reader = CheckpointReader(tiny_ckpt)
    prompts = make_prompts([7, 1, 19, 4, 30], seed=3)
    base_tokens, base_logits = our_greedy(load_local_model(reader, num_slots=7, max_len=64, dtype=torch.float32),
                                          prompts, 8)
    tokens, logits = our_greedy(load_local_model(reader, num_slots=7, max_len=64, dtype=torch.float32),
                                prompts, 8, slots=slots)
    assert tokens == base_tokens
    assert (logits - base_logits).abs().max().item() < 1e-5
    batch = StepBatch.build(slots, [3] * 5, [1] * 5)
    assert batch.contiguous_slots == (sorted(slots) == list(range(5)))
    assert batch.slots.tolist() == sorted(slots)


def test_bf16_matches_reference_as_closely_as_reference_matches_fp32(bf16_ckpt):
    """bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%), so two correct bf16 implementations
    that round in different places differ by roughly as much as either differs from exact maths. The
    honest bound is therefore relative to the reference's own bf16 error: against the fp32 result on
    the same weights, our bf16 logits must be no further off than 1.5x the reference's bf16 logits
    (plus 0.02, about 1% of the logits' scale, so identical-error cases are not flaky), and the
    two bf16 runs must agree with each other to within that same budget."""
    reader = CheckpointReader(bf16_ckpt)
    prompts = make_prompts([6, 11, 3, 9], seed=11)
    ours = load_local_model(reader, num_slots=4, max_len=64, dtype=torch.bfloat16)
    exact = load_local_model(reader, num_slots=4, max_len=64, dtype=torch.float32)
    batch = StepBatch.build([0, 1, 2, 3], [0] * 4, [len(p) for p in prompts])
    ids = torch.tensor(sum(prompts, []))
    our_logits, exact_logits = ours.forward(batch, ids), exact.forward(batch, ids)
    ref = load_reference(bf16_ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_logits = torch.stack([ref(torch.tensor([p])).logits[0, -1].float() for p in prompts])
    ref_err = (ref_logits - exact_logits).abs().max().item()
    our_err = (our_logits - exact_logits).abs().max().item()
    assert ref_err > 0, "the reference did not run in bf16"
    assert our_err <= 1.5 * ref_err + 0.02, f"ours off by {our_err:.3f}, reference by {ref_err:.3f}"
    assert (our_logits - ref_logits).abs().max().item() <= 1.5 * ref_err + 0.02
    assert (our_logits.argmax(-1) == ref_logits.argmax(-1)).all()
