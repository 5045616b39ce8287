"""The `expertmesh` command line.

    expertmesh init-model --preset tiny --out DIR     write a random-weight Mixtral checkpoint
    expertmesh serve [--model DIR] [--port 50051]     start the cluster and its gRPC API
    expertmesh generate "PROMPT" [--address H:P]      stream a completion from a server
    expertmesh generate "PROMPT" --local [--model D]  generate in this process (single-process engine)
    expertmesh top [--metrics URL]                    live layer x expert load heat map

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
# Where `generate` finds the bearer token when no flag gives one: out of `ps`, out of shell history.
TOKEN_ENV = "EXPERTMESH_AUTH_TOKEN"


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


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == []
                     or action.default is argparse.SUPPRESS)  # (0 and 0.0 are shown: `0 in (False,)`)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 0 or 1 = off")
    p.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling_params(args: argparse.Namespace):
    """The flags as sampling parameters, checked here: a bad value is named before any connection (a
    negative one would otherwise fail as protobuf's 'Value out of range')."""
    from expertmesh.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                            top_p=1.0 if args.top_p == 0.0 else args.top_p,  # 0 = off, as in the API
                            seed=args.seed, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    params.validate()
    return params


def _token_args(p: argparse.ArgumentParser, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--auth-token-file", metavar="FILE", help=f"file holding the bearer token {what}")
    group.add_argument("--auth-token", metavar="TOKEN",
                       help="the token itself; other users can read it in `ps`: prefer --auth-token-file")


def _warn_if_token_in_argv(args: argparse.Namespace) -> None:
    if args.auth_token is not None:
        log.warning("--auth-token puts the token where other users of this machine can read it (ps, "
                    "/proc); use --auth-token-file instead")


def cmd_init_model(args: argparse.Namespace) -> int:
    files = write_preset(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                         max_shard_bytes=args.max_shard_mb << 20)
    print(f"wrote {args.preset} checkpoint to {args.out}: {', '.join(files)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.local:
        return _generate_local(args)
    import grpc

    from expertmesh.services.access import bearer_metadata
    from expertmesh.services.convert import sampling_to_pb
    from expertmesh.v1 import generate_pb2, generate_pb2_grpc

    sampling = sampling_to_pb(_sampling_params(args))
    channel, token = _connect(args)
    with channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        try:
            first = True
            for msg in stub.GenerateStream(generate_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling),
                                           timeout=args.timeout, metadata=bearer_metadata(token)):
                if first:  # only once the server answers: a failed call writes nothing to stdout
                    sys.stdout.write(args.prompt)
                    first = False
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    reason = generate_pb2.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_")
                    sys.stdout.write(f"\n[finish_reason={reason.lower()} "
                                     f"completion_tokens={msg.usage.completion_tokens}]\n")
        except grpc.RpcError as exc:
            print(f"{'' if first else chr(10)}expertmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _connect(args: argparse.Namespace):
    """`generate`'s channel (TLS with --tls or --tls-ca) and bearer token (a flag, else $EXPERTMESH_AUTH_TOKEN)."""
    import grpc

    from expertmesh.services.access import read_file, read_token

    _warn_if_token_in_argv(args)
    token = read_token(args.auth_token, args.auth_token_file)
    if token is None and os.environ.get(TOKEN_ENV):
        token = read_token(os.environ[TOKEN_ENV], source=TOKEN_ENV)
    if args.tls or args.tls_ca:
        ca = read_file("--tls-ca", args.tls_ca) if args.tls_ca else None
        return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=ca)), token
    if token:
        log.warning("sending the bearer token without TLS: add --tls or --tls-ca unless the connection is local "
                    "or tunnelled")
    return grpc.insecure_channel(args.address), token


def _generate_local(args: argparse.Namespace) -> int:
    from expertmesh.engine import Engine, GenerationRequest

    model = args.model or default_checkpoint()
    engine = Engine.from_checkpoint(model, max_batch_size=1)
    engine.add(GenerationRequest(prompt=args.prompt, params=_sampling_params(args)))
    sys.stdout.write(args.prompt)
    while engine.scheduler.has_work():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finish_reason:
                sys.stdout.write(f"\n[finish_reason={out.finish_reason} completion_tokens={out.completion_tokens}]\n")
    return 0


def _internal_tls(args: argparse.Namespace) -> tuple[str, str, str] | None:
    """The three paths, absolute (components may start in other directories), or None; a partial set
    is passed through for InternalTLS.load to reject with a message."""
    paths = (args.internal_tls_ca, args.internal_tls_cert, args.internal_tls_key)
    if not any(paths):
        return None
    return tuple(os.path.abspath(p) if p else p for p in paths)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from expertmesh.orchestrator.cluster import ComponentStartError
    from expertmesh.orchestrator.serve import ServeOptions, serve

    if args.start_timeout <= 0:
        print(f"expertmesh serve: --start-timeout ({args.start_timeout:g}) must be positive", file=sys.stderr)
        return 2
    if args.max_tokens_per_step < args.max_batch_size:
        print(f"expertmesh serve: --max-tokens-per-step ({args.max_tokens_per_step}) must be at least "
              f"--max-batch-size ({args.max_batch_size}): every running sequence decodes one token per step",
              file=sys.stderr)
        return 2
    opts = ServeOptions(
        model=str(args.model or default_checkpoint()), host=args.host, port=args.port, ray_address=args.ray_address,
        attention_shards=args.attention_shards, expert_groups=args.expert_groups,
        expert_replicas=args.expert_replicas, router=args.router,
        device=args.device,
        dtype=args.dtype, gpus_per_shard=args.gpus_per_shard, gpus_per_group=args.gpus_per_group,
        attention_resource=args.attention_resource, expert_resource=args.expert_resource,
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, max_waiting=args.max_waiting,
        max_tokens_per_step=args.max_tokens_per_step,
        internal_tls=_internal_tls(args),
        threads=args.threads, attention_threads=args.attention_threads, head_threads=args.head_threads,
        grace_s=args.grace, start_timeout_s=args.start_timeout,
        metrics_port=args.metrics_port, tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=args.auth_token,
        auth_token_file=args.auth_token_file)
    _warn_if_token_in_argv(args)
    try:
        return asyncio.run(serve(opts))
    except ComponentStartError as exc:  # its message is the component's own error; Ray's traceback is noise
        print(f"expertmesh serve: {exc}", file=sys.stderr)
        return 1


def cmd_top(args: argparse.Namespace) -> int:
    from expertmesh.services.top import run_top

    try:
        run_top(args.metrics, args.interval, args.iterations)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # URLError too: nothing listening, a wrong host
        print(f"expertmesh top: cannot read {args.metrics}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", formatter_class=_HelpFormatter,
                       help="write a random-weight checkpoint in the Hugging Face Mixtral format")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True, help="the model's sizes")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the weights are stored in")
    p.add_argument("--max-shard-mb", type=int, default=512, help="shard the safetensors past this size")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", formatter_class=_HelpFormatter,
                       help="stream a completion from a server (or, with --local, in this process)")
    p.add_argument("prompt", help="the text to complete")
    p.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of the call, seconds")
    p.add_argument("--local", action="store_true", help="run the single-process engine here instead")
    p.add_argument("--model", help="with --local: checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CA certificates")
    p.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting this CA certificate (PEM)")
    _token_args(p, f"to send (default: ${TOKEN_ENV}, if set)")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", formatter_class=_HelpFormatter,
                       help="start the cluster on Ray and serve the gRPC Generate API")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model, created once)")
    p.add_argument("--host", default="127.0.0.1", help="address the public API listens on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port (printed)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start an embedded local one)")
    p.add_argument("--attention-shards", type=int, default=1, help="contiguous layer ranges, each an actor")
    p.add_argument("--expert-groups", type=int, default=1,
                   help="actors the experts are split over (expert e of every layer in one group)")
    p.add_argument("--expert-replicas", type=int, default=1,
                   help="copies of each expert group: load spreads over them and a dead one fails over at once")
    p.add_argument("--router", choices=["service", "inline"], default="service",
                   help="service: a RouterService actor per attention shard; inline: the router runs inside "
                        "each shard's process (one network hop less per layer)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every component computes")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, the checkpoint's on cuda")
    p.add_argument("--gpus-per-shard", type=float, help="GPU share per attention shard (default 1 on cuda)")
    p.add_argument("--gpus-per-group", type=float, help="GPU share per expert group (default 1 on cuda)")
    p.add_argument("--attention-resource", help="custom Ray resource that marks attention nodes")
    p.add_argument("--expert-resource", help="custom Ray resource that marks expert nodes")
    p.add_argument("--max-batch-size", type=int, default=32, help="KV-cache slots: sequences per step")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context per sequence (capped by the model's)")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-tokens-per-step", type=int, default=4096,
                   help="token budget of one step (longer prompts prefill in chunks); at least --max-batch-size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per component")
    p.add_argument("--attention-threads", type=int,
                   help="torch CPU threads of an attention shard's layers in steps of 32 tokens or more, which run "
                        "while the expert groups wait (default: the node's cores, at most 8); see docs/operations.md")
    p.add_argument("--head-threads", type=int,
                   help="torch CPU threads of the last attention shard's LM head, which runs while every other "
                        "component waits (default: the node's cores, at most 8)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds every component gets to be placed and load its weights (nodes an autoscaler "
                        "adds, image pulls and weight reads included) before serve gives up")
    p.add_argument("--metrics-port", type=int, help="serve the whole cluster's Prometheus metrics on this port")
    p.add_argument("--tls-cert", metavar="FILE", help="serve the API over TLS with this PEM certificate chain")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM, unencrypted)")
    p.add_argument("--internal-tls-ca", metavar="FILE",
                   help="mutual TLS between the cluster's components: the CA every component requires of its peers")
    p.add_argument("--internal-tls-cert", metavar="FILE",
                   help="the components' certificate chain (subject alt name DNS:expertmesh-internal), same path "
                        "on every node")
    p.add_argument("--internal-tls-key", metavar="FILE", help="its private key (unencrypted PEM)")
    _token_args(p, "every call must carry (health checks stay open)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("top", formatter_class=_HelpFormatter,
                       help="live layer x expert load heat map from a server's metrics endpoint")
    p.add_argument("--metrics", default="http://127.0.0.1:9464/metrics", help="the serve --metrics-port URL")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    p.add_argument("--iterations", type=int, help="redraw this many times, then exit (default: until Ctrl-C)")
    p.set_defaults(func=cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # what a user got wrong: the message names the file or flag
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
