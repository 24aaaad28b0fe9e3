"""``megavla serve EXPORT_OR_CHECKPOINT``: serve a trained policy to openpi clients over a websocket.

    megavla serve runs/mine/export                        # ws://127.0.0.1:8000, CPU
    megavla serve runs/mine/export --host 0.0.0.0 --port 8000 --device cuda --dtype bf16 --api-key "$KEY"
    megavla serve runs/mine/export --print-schema         # the observation keys a client must send

Client side (unmodified openpi-client)::

    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    client = WebsocketClientPolicy("127.0.0.1", 8000, api_key=KEY)
    client.get_server_metadata()          # preset, action dims + names, chunk length, cameras, schema
    client.infer(obs)["actions"]          # float32 [H, D], unnormalized

The API key may also come from the environment variable MEGAVLA_API_KEY (keeps it out of `ps`), or
several keys from --api-key-file (one per line), e.g. one per robot or user: each key has its own
--max-clients-per-key.

One client cannot cost another anything: a bad request (wrong key, shape, dtype, a NaN, a state far
outside what the model was trained on) gets its own error reply before it joins a batch; a
connection that sends nothing for --idle-timeout-s is closed; when a connection limit is reached
(--max-clients, --max-clients-per-address, --max-clients-per-key) the connection of that scope that
has been silent longest (at least --evict-idle-s) is closed to make room, and only if every one is
busy is the newcomer refused (HTTP 429 over its own address or key limit, 503 for a full server).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from megavla.config import ConfigError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavla serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="export dir (megavla export), checkpoint dir or run dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights' dtype (bf16 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default on --device cpu: 1, or OMP_NUM_THREADS when set; "
                        "0 = torch's own; see megavla/eval/threads.py)")
    p.add_argument("--flow-steps", type=int, default=10, help="Euler steps of the flow sampler (default 10)")
    p.add_argument("--subtask", action="store_true", help="also predict the next subtask's text per request")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the sampler (equal to eager; the first request of each prompt-length / "
                        "batch bucket compiles: seconds from inductor's on-disk cache, ~1 min cold on a CPU)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Api-Key <key>' (or MEGAVLA_API_KEY); may be repeated")
    p.add_argument("--api-key-file", default=None,
                   help="file with one API key per line (blank lines and '#' comments skipped)")
    p.add_argument("--schema", default=None, help="observation schema YAML (default: EXPORT/observation_schema.yaml "
                                                  "if present, else the built-in keys; see --print-schema)")
    p.add_argument("--seed", type=int, default=0, help="seed of each connection's noise stream")
    p.add_argument("--max-batch", type=int, default=8, help="requests per forward at most")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="longest wait for more requests once one is queued (default 10)")
    p.add_argument("--max-message-mb", type=float, default=32.0, help="largest request accepted (MiB)")
    p.add_argument("--max-clients", type=int, default=16, help="connections served at once (default 16)")
    p.add_argument("--max-clients-per-address", type=int, default=8,
                   help="connections from one IP address at once (default 8)")
    p.add_argument("--max-clients-per-key", type=int, default=8,
                   help="connections with one API key at once (default 8)")
    p.add_argument("--idle-timeout-s", type=float, default=300.0,
                   help="close a connection that sends no request for this long (default 300)")
    p.add_argument("--evict-idle-s", type=float, default=2.0,
                   help="when a limit is reached, a connection silent this long may be closed to admit "
                        "a new one (default 2)")
    p.add_argument("--print-schema", action="store_true", help="print the metadata clients get, then exit")
    return p


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    if not keys and os.environ.get("MEGAVLA_API_KEY"):
        keys.append(os.environ["MEGAVLA_API_KEY"])
    if args.api_key_file:
        try:
            lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise FileNotFoundError(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {args.api_key_file}: no keys in it (one per line)")
    return tuple(keys)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .policy import load_policy
    from .server import PolicyServer, ServerOptions
    from megavla.eval.policy import CheckpointError

    try:
        policy = load_policy(args.path, device=args.device, flow_steps=args.flow_steps, subtask=args.subtask,
                             schema=args.schema, seed=args.seed, dtype=args.dtype, threads=args.threads,
                             compile=args.compile)
        options = ServerOptions(host=args.host, port=args.port, api_keys=_api_keys(args),
                                max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                max_message_bytes=int(args.max_message_mb * (1 << 20)),
                                max_clients=args.max_clients, max_clients_per_address=args.max_clients_per_address,
                                max_clients_per_key=args.max_clients_per_key, idle_timeout_s=args.idle_timeout_s,
                                evict_idle_s=args.evict_idle_s)
        server = PolicyServer(policy, options)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"megavla serve: error: {e}\n")
        return 2
    if args.print_schema:
        sys.stdout.write(yaml.safe_dump(policy.metadata, sort_keys=False))
        return 0

    def ready(host: str, port: int) -> None:
        meta = policy.metadata
        print(f"megavla serve: {policy.loaded.path} ({meta['preset']}, {meta['embodiment']}, actions "
              f"[{meta['chunk_length']}, {meta['action_dim']}], cameras {', '.join(meta['cameras'])}) on "
              f"ws://{host}:{port}{' (API key required)' if options.keys else ''}", flush=True)

    try:
        server.run(ready)
    except OSError as e:  # port in use, address not available
        sys.stderr.write(f"megavla serve: cannot listen on {args.host}:{args.port}: {e}\n")
        return 3
    log.info("stopped")
    return 0
