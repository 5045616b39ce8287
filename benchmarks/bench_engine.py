"""Decode throughput: the single-process engine against transformers' `generate`, side by side.

Both run greedy, in this process, on the same checkpoint and device (fp32 on CPU by default), with the
same prompts (random ids, equal length so transformers needs no padding), alternating round by round so
machine noise hits both alike. Decode time is measured the same way for both: time(N new tokens) - time(1 new token),
so prefill is excluded; decode tokens/s = batch * (N - 1) / decode time.

    python benchmarks/bench_engine.py --model DIR [--batch 1 8 32] [--rounds 3] [--device cuda --dtype bfloat16]

Without --model it writes the `small` preset to a temporary directory first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.presets import DTYPES, write_preset
from expertmesh.sampling import SamplingParams


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(length - 1)] for _ in range(batch)]


def time_engine(engine: Engine, ids: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate([GenerationRequest(prompt_token_ids=tuple(p), params=params) for p in ids])
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == new_tokens for r in results)
    return elapsed


def time_transformers(model, ids: list[list[int]], new_tokens: int) -> float:
    import transformers

    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           eos_token_id=None, pad_token_id=0)
    device = model.device
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, device=device),
                             attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long, device=device),
                             generation_config=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == len(ids[0]) + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()

    import transformers

    model_dir = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        write_preset("small", model_dir)
    dtype = DTYPES[args.dtype]
    engine = Engine.from_checkpoint(model_dir, dtype=dtype, device=args.device, max_batch_size=max(args.batch),
                                    max_seq_len=args.prompt_len + args.new_tokens)
    hf = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy {args.dtype}, "
          f"median of {args.rounds} rounds\n")
    print("| batch | expertmesh engine tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    for batch in args.batch:
        ids = prompts(batch, args.prompt_len)
        ours, theirs = [], []
        time_engine(engine, ids, 2), time_transformers(hf, ids, 2)  # warm-up
        for _ in range(args.rounds):
            decode = time_engine(engine, ids, args.new_tokens) - time_engine(engine, ids, 1)
            ours.append(batch * (args.new_tokens - 1) / decode)
            decode = time_transformers(hf, ids, args.new_tokens) - time_transformers(hf, ids, 1)
            theirs.append(batch * (args.new_tokens - 1) / decode)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {batch} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
