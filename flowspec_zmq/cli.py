"""`flowspec` command line: prepare models, launch nodes, generate, chat, serve HTTP, benchmark."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .client import DEFAULT_ADDRESS, Client, GenerationFailed
from .devices import DeviceUnavailable
from .launch import LocalCluster, NodeDied
from .models import MODELS, ModelNotPrepared, prepare
from .security import client_keys, create_keys
from .topology import TopologyError, default_topology_path, load_topology

DEMO_PROMPT = "What is the capital of Italy? Answer in one sentence."
OPTION_FLAGS = ("mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "draft", "segment_size",
                "tree_depth", "tree_top_k", "tree_total_tokens", "tree_width", "draft_vocab")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"the head's client address (default: from the topology, else {DEFAULT_ADDRESS})")
    parser.add_argument("--topology", type=Path, default=None, help="topology file (default: the repo's topology.toml)")
    parser.add_argument("--mode", choices=["ar", "tree", "specpipe", "flowspec"])
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--draft", help="int8, bf16, ngram or model:NAME_OR_PATH (a smaller model with the same tokenizer)")
    parser.add_argument("--segment-size", type=int)
    parser.add_argument("--tree-depth", type=int)
    parser.add_argument("--tree-top-k", type=int)
    parser.add_argument("--tree-total-tokens", type=int)
    parser.add_argument("--tree-width", type=int)
    parser.add_argument("--draft-vocab", type=int, help="draft vocabulary size (0: the whole vocabulary)")
    parser.add_argument("--stop", action="append", help="end the output before this string (repeatable)")
    parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=False,
                        help="one line of statistics after each answer: tokens, tokens/s, accepted per verification")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) is not None}


def _client(args: argparse.Namespace) -> Client:
    """A client for the topology's head, with the client key pair when the cluster requires keys."""
    topology = load_topology(args.topology or default_topology_path())
    return Client(args.address or topology.client_address, keys=client_keys(topology.keys))


def stats_line(stats: dict[str, Any]) -> str:
    """A finished generation's statistics as one line for people."""
    return (f"{stats['tokens']} tokens · {stats['tokens_per_s']:.1f} tokens/s · "
            f"{stats['accepted_per_verification']:.2f} accepted per verification · "
            f"first token after {stats['prefill_s']:.2f} s")


async def _stream(client: Client, options: dict[str, Any], show_stats: bool, **prompt: Any) -> str:
    text = ""
    stats: dict[str, Any] = {}
    try:
        async for event in client.events(**prompt, **options):
            if event["event"] == "tokens":
                print(event["text"], end="", flush=True)
                text += event["text"]
            elif event["event"] == "done":
                stats = event["stats"]
    finally:
        print(flush=True)  # ends the streamed line (before the stats on stderr, or an error message)
    if show_stats:
        print(f"[{stats_line(stats)}]", file=sys.stderr, flush=True)
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    asyncio.run(_stream(_client(args), _options(args), args.stats, prompt=args.prompt, stop=args.stop))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    client = _client(args)
    messages: list[dict[str, str]] = []
    print("Chat with the model; an empty line or Ctrl-D ends it.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        try:
            reply = asyncio.run(_stream(client, _options(args), args.stats, messages=messages, stop=args.stop))
        except GenerationFailed as exc:  # this turn failed; the conversation goes on
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .status import status_view

    info = asyncio.run(_client(args).info())  # nothing answering: GenerationFailed, one line and exit 1
    Console().print(status_view(info))
    return 0 if info["health"]["ok"] else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_launch(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.topology or default_topology_path(), names=args.nodes or None, restart=True)
    print(f"starting {', '.join(cluster.names)} (logs in {cluster.log_dir})", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the cluster exactly like Ctrl-C
    try:
        cluster.start()
        started = time.monotonic()
        cluster.wait_ready(on_ready=lambda name: print(f"  {name} ready after {time.monotonic() - started:.1f} s", flush=True))
        print("all nodes ready; Ctrl-C stops them", flush=True)
        if (http := cluster.topology.http) is not None:
            print(f"OpenAI-compatible API on http://{http.host}:{http.port}/v1", flush=True)
        while True:
            for name in cluster.check():
                print(f"  {name} died; restarted it (the head re-prefills its cache)", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    finally:
        cluster.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare the topology's model if needed, launch the local topology, answer one chat message,
    stop everything."""
    topology_path = args.topology or default_topology_path()
    if (source := load_topology(topology_path).model.source) in MODELS:
        prepare(source)  # the first time: installs and converts the weights (a minute or two); then instant
    cluster = LocalCluster(topology_path)
    print(f"starting {len(cluster.names)} nodes (logs in {cluster.log_dir}) ...", flush=True)
    with cluster:
        print(f"you> {args.prompt}\nmodel> ", end="", flush=True)
        args.topology = topology_path
        messages = [{"role": "user", "content": args.prompt}]
        asyncio.run(_stream(_client(args), _options(args), args.stats, messages=messages, stop=args.stop))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from .nodes.__main__ import run_node

    try:
        run_node(args.topology or default_topology_path(), args.name)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .http_gateway import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(load_topology(args.topology or default_topology_path()), args.host, args.port))
    except KeyboardInterrupt:  # Ctrl-C: the server has shut down cleanly
        pass
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology or default_topology_path())
    made = create_keys(args.folder, [n.name for n in topology.nodes])
    print(f"wrote {len(made)} key pairs to {args.folder}; add to the topology:\n[security]\nkeys = \"{args.folder}\"")
    return 0


# Commands whose code and argument parsing live in their own modules; `flowspec NAME --help` shows their options.
TOOL_COMMANDS = {
    "prepare": ("flowspec_zmq.prepare_models", "prepare a built-in model, a .gguf file or a model directory for offline use"),
    "bench": ("flowspec_zmq.bench", "every decoding mode on the same prompts, edge-emulated: table, JSON, plots"),
    "profile": ("flowspec_zmq.profile_stage", "time this machine's stage forward per layer, to calibrate device profiles"),
}


# Errors whose message says everything the user needs: one line, exit 2 for a configuration
# mistake and 1 otherwise. OSError covers unreadable files and readiness timeouts.
CONFIG_ERRORS = (TopologyError,)
EXPECTED_ERRORS = (*CONFIG_ERRORS, ModelNotPrepared, GenerationFailed, NodeDied, DeviceUnavailable, OSError,
                   KeyboardInterrupt)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = argv[:1] == ["--debug"]  # global: before the command, so tool commands get it too
    try:
        return _dispatch(argv[1:] if debug else argv)
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else " ".join(str(exc).split()) or type(exc).__name__
        print(f"flowspec: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, CONFIG_ERRORS) else 1


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in TOOL_COMMANDS:
        return importlib.import_module(TOOL_COMMANDS[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="flowspec", description=__doc__)
    # main() takes it off argv before parsing; declared here so that --help lists it.
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, summary) in TOOL_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)

    keys = commands.add_parser("keys", help="create CurveZMQ key pairs for every node and the client")
    keys.add_argument("folder", type=Path)
    keys.add_argument("--topology", type=Path)
    keys.set_defaults(run=cmd_keys)

    launch = commands.add_parser("launch", help="start every node of the topology that lives on this machine")
    launch.add_argument("topology", nargs="?", type=Path)
    launch.add_argument("--nodes", nargs="*", help="only these nodes")
    launch.set_defaults(run=cmd_launch)

    node = commands.add_parser("node", help="run one node (one command per host)")
    node.add_argument("name")
    node.add_argument("--topology", type=Path)
    node.set_defaults(run=cmd_node)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API in front of a running head")
    serve.add_argument("--topology", type=Path)
    serve.add_argument("--host", help="listen address (default: [http] host, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: [http] port, else 8000)")
    serve.set_defaults(run=cmd_serve)

    generate = commands.add_parser("generate", help="stream a completion from a running head")
    generate.add_argument("prompt")
    _add_options(generate)
    generate.set_defaults(run=cmd_generate)

    status = commands.add_parser("status", help="every node's host, layers, health, memory and last heartbeat")
    status.add_argument("--address", help=f"the head's client address (default: from the topology, else {DEFAULT_ADDRESS})")
    status.add_argument("--topology", type=Path, help="topology file (default: the repo's topology.toml)")
    status.set_defaults(run=cmd_status)

    chat = commands.add_parser("chat", help="multi-turn chat with a running head")
    _add_options(chat)
    chat.set_defaults(run=cmd_chat, stats=True)

    demo = commands.add_parser("demo", help="prepare and launch the local topology, answer one chat message, stop")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    _add_options(demo)
    demo.set_defaults(run=cmd_demo, stats=True)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
