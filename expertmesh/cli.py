"""The `expertmesh` command line.

    expertmesh init-model --preset tiny --out DIR     write a random-weight Mixtral checkpoint
    expertmesh generate "PROMPT" [--model DIR]        generate in this process (single-process engine)

Without `--model`, commands use the default checkpoint, created once under the user's cache directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from expertmesh.presets import DTYPES, PRESETS, write_preset

log = logging.getLogger("expertmesh")

DEFAULT_PRESET = "tiny"


def default_checkpoint(preset: str = DEFAULT_PRESET) -> Path:
    """The embedded default model: created on first use, then reused."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache / "expertmesh" / f"{preset}-seed0"
    if not (path / "tokenizer.model").exists():
        log.info("creating the default %s checkpoint in %s", preset, path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_preset(preset, tmp, seed=0)
        try:
            tmp.replace(path)  # atomic: a concurrent first run sees a whole checkpoint or none
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from expertmesh.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_init_model(args: argparse.Namespace) -> int:
    files = write_preset(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                         max_shard_bytes=args.max_shard_mb << 20)
    print(f"wrote {args.preset} checkpoint to {args.out}: {', '.join(files)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from expertmesh.engine import Engine, GenerationRequest

    model = args.model or default_checkpoint()
    engine = Engine.from_checkpoint(model, max_batch_size=1)
    request = GenerationRequest(prompt=args.prompt, params=_sampling_params(args))
    engine.add(request)
    sys.stdout.write(args.prompt)
    while engine.scheduler.has_work():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finish_reason:
                sys.stdout.write(f"\n[finish_reason={out.finish_reason} completion_tokens={out.completion_tokens}]\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a random-weight checkpoint in the Hugging Face Mixtral format")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--max-shard-mb", type=int, default=512, help="shard the safetensors past this size")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="generate a completion with the single-process engine")
    p.add_argument("prompt")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
