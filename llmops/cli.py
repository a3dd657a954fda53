"""The `llmops` command: run the local stack, prepare offline models, serve the gateway."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from llmops.offline_models import prepare_models
from llmops.stack import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    StackLayout,
    gateway_service,
    local_config,
    tail,
    vllm_service,
)

__all__ = ["main"]


def models_home() -> Path:
    return Path(os.environ.get("LLMOPS_HOME", Path.home() / ".cache" / "llmops"))


def _layout(args: argparse.Namespace) -> StackLayout:
    return StackLayout(Path(args.state_dir).resolve())


def _services(args: argparse.Namespace, dirs: dict[str, Path]) -> list:  # type: ignore[type-arg]
    layout = _layout(args)
    return [
        vllm_service("vllm-chat", dirs["chat"], CHAT_MODEL, args.chat_port),
        vllm_service("vllm-embedding", dirs["embedding"], EMBEDDING_MODEL, args.embedding_port,
                     embedding=True, kv_cache_bytes=256 << 20, max_model_len=None),
        gateway_service(args.port, layout.config, layout.key_file),
    ]


def cmd_up(args: argparse.Namespace) -> int:
    layout = _layout(args)
    dirs = prepare_models(models_home())
    key = layout.api_key()
    layout.write_config(local_config(args.chat_port, args.embedding_port))
    services = _services(args, dirs)
    for s in services:
        print(f"{'starting' if layout.start(s) else 'already running'}: {s.name}"
              f" (log: {layout.log_file(s.name)})")
    started = time.monotonic()

    def waiting(names: list[str]) -> None:
        print(f"\r  waiting for {', '.join(names)} ({time.monotonic() - started:.0f} s)   ",
              end="", flush=True)

    try:
        layout.wait_healthy(services, args.timeout, waiting)
    except (RuntimeError, TimeoutError) as exc:
        print(f"\nllmops up failed: {exc}", file=sys.stderr)
        _stop_all(layout, services)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the stack")
        _stop_all(layout, services)
        return 130
    print()
    _print_usage(args.port, key)
    if args.detach:
        print("\nThe stack runs in the background; stop it with `make down` (llmops down).")
        return 0
    print("\nPress Ctrl-C to stop the stack.")
    try:
        while True:
            for s in services:
                if not layout.alive(s):
                    print(f"{s.name} exited; its log ends with:\n{tail(layout.log_file(s.name))}",
                          file=sys.stderr)
                    _stop_all(layout, services)
                    return 1
            time.sleep(2.0)
    except KeyboardInterrupt:
        print("\nstopping the stack")
        _stop_all(layout, services)
        return 0


def _stop_all(layout: StackLayout, services: list) -> None:  # type: ignore[type-arg]
    for s in reversed(services):  # the gateway first, then the engines behind it
        if layout.stop(s.name):
            print(f"stopped: {s.name}")


def cmd_down(args: argparse.Namespace) -> int:
    layout = _layout(args)
    stopped = [n for n in ("gateway", "vllm-embedding", "vllm-chat") if layout.stop(n)]
    print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = _layout(args)
    dirs = {k: models_home() / "models" / v for k, v in
            (("chat", "SmolLM2-135M-Instruct"), ("embedding", "all-MiniLM-L6-v2"))}
    ok = True
    for s in _services(args, dirs):
        state = "healthy" if s.healthy() else (
            "starting" if layout.alive(s) else "stopped")
        ok &= state == "healthy"
        print(f"{s.name:16} {state:9} {s.health_url}")
    return 0 if ok else 1


def cmd_models(_: argparse.Namespace) -> int:
    for kind, path in prepare_models(models_home()).items():
        print(f"{kind}: {path}")
    return 0


def cmd_gateway(_: argparse.Namespace) -> int:
    from gateway.__main__ import main as serve

    serve()
    return 0


def _print_usage(port: int, key: str) -> None:
    base = f"http://127.0.0.1:{port}/v1"
    question = '[{"role": "user", "content": "What is the capital of France?"}]'
    print(f"""
llmops is up.
  base URL: {base}
  API key:  {key}
  models:   {CHAT_MODEL} (chat, LoRA-ready), {EMBEDDING_MODEL} (embeddings)

  curl {base}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{CHAT_MODEL}", "messages": {question}}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{base}", api_key="{key}")
r = c.chat.completions.create(model="{CHAT_MODEL}", messages={question})
print(r.choices[0].message.content)'""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("LLMOPS_STATE_DIR", ".llmops"),
                        help="where the local stack keeps config, key, pids and logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=8000, help="gateway port")
        p.add_argument("--chat-port", type=int, default=8101)
        p.add_argument("--embedding-port", type=int, default=8102)

    up = sub.add_parser("up", help="start the local stack and print how to call it")
    stack_args(up)
    up.add_argument("--detach", action="store_true", help="return once the stack is healthy")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for health")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the local stack")
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="show the local stack's health")
    stack_args(status)
    status.set_defaults(func=cmd_status)
    models = sub.add_parser("models", help="prepare the offline models (cached)")
    models.set_defaults(func=cmd_models)
    gw = sub.add_parser("gateway", help="serve the gateway (settings from LLMOPS_* / YAML)")
    gw.set_defaults(func=cmd_gateway)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
