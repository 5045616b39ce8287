"""The CUDA path, on a real GPU: what `--device cuda` users run.

* The engine on the GPU against `transformers.MixtralForCausalLM` on the GPU, on the same weights:
  fp32 greedy tokens identical and logits close; bf16 within the reference's own bf16 rounding.
* `expertmesh serve --device cuda` with an embedded Ray that found the machine's GPUs: every attention
  shard and expert group asks Ray for a GPU share, computes on it, and the served tokens are the
  engine's on the same GPU (fp32 with the router service and 16 concurrent requests; bf16 with the
  router inline, one request at a time, so both sides run the same kernels on the same shapes).

Skipped without a CUDA device (CI has none; `test_cluster.py` checks GPU placement there with
declared GPUs). On a GPU machine: `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from expertmesh.checkpoint import CheckpointReader
from expertmesh.engine import Engine, GenerationRequest
from expertmesh.model.batch import StepBatch
from expertmesh.model.load import load_local_model
from expertmesh.sampling import SamplingParams
from expertmesh.v1 import generate_pb2, generate_pb2_grpc
from reference import load_reference, reference_greedy
from serving import serve_process, wait_for_line, wait_serving
from test_parity import make_prompts, our_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 32
FP32_ATOL = 1e-3  # GPU reductions differ in order between batch shapes; measured differences are reported
SHARDS, GROUPS = 2, 4
GPU_SHARE = "0.125"  # 2 shards + 4 groups on one GPU


@pytest.mark.parametrize("ckpt_name", ["tiny_ckpt", "hf_ckpt"])
def test_gpu_fp32_greedy_tokens_match_reference_on_gpu(ckpt_name, request):
    ckpt = request.getfixturevalue(ckpt_name)
    stack = load_local_model(CheckpointReader(ckpt), num_slots=5, max_len=128, dtype=torch.float32, device="cuda")
    assert stack.device.type == "cuda"
    prompts = make_prompts([7, 1, 19, 4, 30], seed=len(ckpt_name))
    tokens, logits = our_greedy(stack, prompts, STEPS)
    ref = load_reference(ckpt).to("cuda")
    worst = 0.0
    for b, prompt in enumerate(prompts):
        ref_tokens, ref_logits = reference_greedy(ref, prompt, STEPS)
        assert tokens[b] == ref_tokens, f"prompt {b}: greedy tokens differ"
        worst = max(worst, (logits[b] - ref_logits).abs().max().item())
    print(f"{ckpt_name}: max |logit difference| on the GPU, fp32: {worst:.2e}")
    assert worst < FP32_ATOL


def test_gpu_bf16_matches_reference_as_closely_as_reference_matches_fp32(bf16_ckpt):
    """As the CPU bf16 test (test_parity.py), on the GPU: our bf16 logits no further from the exact
    (fp32, CPU) ones than 1.5x the reference's bf16 logits are, plus 0.02."""
    reader = CheckpointReader(bf16_ckpt)
    prompts = make_prompts([6, 11, 3, 9], seed=11)
    ours = load_local_model(reader, num_slots=4, max_len=64, dtype=torch.bfloat16, device="cuda")
    exact = load_local_model(reader, num_slots=4, max_len=64, dtype=torch.float32)
    ids = sum(prompts, [])
    lens = [len(p) for p in prompts]
    our_logits = ours.forward(StepBatch.build([0, 1, 2, 3], [0] * 4, lens, device="cuda"),
                              torch.tensor(ids, device="cuda")).cpu()
    exact_logits = exact.forward(StepBatch.build([0, 1, 2, 3], [0] * 4, lens), torch.tensor(ids))
    ref = load_reference(bf16_ckpt, dtype=torch.bfloat16).to("cuda")
    with torch.no_grad():
        ref_logits = torch.stack([ref(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu() for p in prompts])
    ref_err = (ref_logits - exact_logits).abs().max().item()
    our_err = (our_logits - exact_logits).abs().max().item()
    print(f"bf16 on the GPU: ours {our_err:.3f}, reference {ref_err:.3f} from fp32")
    assert ref_err > 0, "the reference did not run in bf16"
    assert our_err <= 1.5 * ref_err + 0.02, f"ours off by {our_err:.3f}, reference by {ref_err:.3f}"
    assert (our_logits - ref_logits).abs().max().item() <= 1.5 * ref_err + 0.02
    assert (our_logits.argmax(-1) == ref_logits.argmax(-1)).all()


def gpu_processes() -> set[int]:
    """Process ids holding a CUDA context on GPU 0, as the driver reports them."""
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


@contextlib.contextmanager
def serve_on_gpu(model, *flags: str) -> Iterator[str]:
    """`expertmesh serve --device cuda` with an embedded Ray of its own (so on this machine's real
    GPUs, not the test session's cluster of declared ones); its address once SERVING. On leaving,
    SIGTERM: it must exit 0 in time."""
    with serve_process(model, None, "--device", "cuda", "--attention-shards", str(SHARDS), "--expert-groups",
                       str(GROUPS), "--gpus-per-shard", GPU_SHARE, "--gpus-per-group", GPU_SHARE,
                       "--max-batch-size", "16", "--max-seq-len", "96", *flags) as (proc, lines):
        address = wait_for_line(proc, lines, r"serving .* on (\S+:\d+)", timeout_s=300)
        wait_serving(address)
        yield address


def check_placement(stub) -> None:
    """Every expert group was given GPU 0 by Ray, and every shard and group holds a CUDA context on it."""
    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10)
    assert [list(g.gpu_ids) for g in info.expert_groups] == [["0"]] * GROUPS
    others = gpu_processes() - {os.getpid()}
    assert len(others) >= SHARDS + GROUPS, f"{len(others)} other processes on the GPU"


def requests(n: int, seed: int = 0) -> list[GenerationRequest]:
    prompts = make_prompts([3 + (7 * i) % 40 for i in range(n)], seed=seed)
    return [GenerationRequest(prompt_token_ids=tuple(p), request_id=f"r{i}",
                              params=SamplingParams(max_new_tokens=4 + (5 * i) % 20, ignore_eos=True,
                                                    **({"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 4 == 3
                                                       else {})))
            for i, p in enumerate(prompts)]


def to_pb(r: GenerationRequest) -> generate_pb2.GenerateRequest:
    p = r.params
    sampling = generate_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
                                           ignore_eos=p.ignore_eos)
    if p.seed is not None:
        sampling.seed = p.seed
    return generate_pb2.GenerateRequest(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                                        sampling=sampling)


def test_served_cluster_on_the_gpu_fp32_matches_the_engine_on_the_gpu(tiny_ckpt):
    """16 concurrent requests arriving staggered (greedy, and seeded sampling for every fourth),
    router service: the engine's tokens, which it computed with all 16 in one batch."""
    reqs = requests(16)
    expected = {r.request_id: r.token_ids for r in Engine.from_checkpoint(
        tiny_ckpt, dtype=torch.float32, device="cuda", max_batch_size=16, max_seq_len=96).generate(reqs)}
    with serve_on_gpu(tiny_ckpt, "--dtype", "float32", "--router", "service") as address:
        stub = generate_pb2_grpc.GenerateServiceStub(grpc.insecure_channel(address))
        got: dict[str, list[int]] = {}

        def call(r: GenerationRequest) -> None:
            got[r.request_id] = list(stub.Generate(to_pb(r), timeout=120).token_ids)

        threads = [threading.Thread(target=call, args=(r,)) for r in reqs]
        for k, t in enumerate(threads):
            t.start()
            if k % 4 == 3:
                time.sleep(0.05)  # later requests join a running batch
        for t in threads:
            t.join(timeout=180)
        assert got == expected
        check_placement(stub)


def test_served_cluster_on_the_gpu_bf16_matches_the_engine_on_the_gpu(tiny_ckpt):
    """bf16, router inline: each request alone through the cluster and alone through the engine."""
    reqs = requests(6, seed=1)
    engine = Engine.from_checkpoint(tiny_ckpt, dtype=torch.bfloat16, device="cuda", max_batch_size=1,
                                    max_seq_len=96)
    expected = {r.request_id: engine.generate([r])[0].token_ids for r in reqs}
    with serve_on_gpu(tiny_ckpt, "--dtype", "bfloat16", "--router", "inline") as address:
        stub = generate_pb2_grpc.GenerateServiceStub(grpc.insecure_channel(address))
        got = {r.request_id: list(stub.Generate(to_pb(r), timeout=120).token_ids) for r in reqs}
        assert got == expected
        check_placement(stub)
