"""``mixpipe serve``: run the selection server until SIGINT or SIGTERM.

With ``--state-dir`` every acknowledged report is logged first and the ledger is written
atomically at each commit, so a killed server restarted on the same directory continues where it
stopped (it must get the same --num-samples, policy, seed and EMA decay; others are refused).

Keys: ``mixpipe serve --generate-keys DIR`` writes a server and a client key pair and exits;
``mixpipe serve --keys DIR`` (or ``MIXPIPE_KEYS=DIR``) then accepts only clients holding an
authorised key (CURVE, see :mod:`mixpipe.server.keys`). Without keys the server binds loopback
addresses only (``--insecure`` overrides that), and ``--allow-load-state`` is needed before a
client may replace the whole state over the network.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=None,
                        help="dataset size (required unless --generate-keys)")
    parser.add_argument("--generate-keys", metavar="DIR", default=None,
                        help="write a server and a client CURVE key pair into DIR and exit")
    parser.add_argument("--keys", metavar="DIR", default=None,
                        help="key directory: accept only clients with an authorised key "
                             "(default: $MIXPIPE_KEYS, else no authentication)")
    parser.add_argument("--allow-load-state", action="store_true",
                        help="let clients replace the whole state (LOAD_STATE) over the network")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without keys")
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555",
                        help="ZeroMQ endpoint to listen on (port * picks a free one)")
    parser.add_argument("--state-dir", default=None,
                        help="directory for the ledger and the write-ahead log (crash safety); "
                             "without it the state lives in memory only")
    parser.add_argument("--policy", default="none", help="policy name (none, random, mixtrain, "
                                                        "shrink, ...)")
    parser.add_argument("--policy-json", default=None,
                        help="policy settings as a JSON object, e.g. '{\"fraction\": 0.5}'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy's random choices")
    parser.add_argument("--ema-decay", type=float, default=0.7, help="ledger EMA decay in [0, 1)")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync each logged report before acknowledging it (survives power "
                             "loss, much slower); without it reports survive a process crash")
    parser.add_argument("--log-level", default="INFO", help="logging level")


def _settings(args: argparse.Namespace) -> Any:
    from ..core.policies import settings_from_dict

    extra = {}
    if args.policy_json:
        try:
            extra = json.loads(args.policy_json)
        except ValueError as err:
            raise ValueError(f"--policy-json is not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise ValueError("--policy-json must be a JSON object")
    return settings_from_dict({**extra, "policy": args.policy})


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .inprocess import InProcessService
    from .keys import generate_keys
    from .network import SelectionServer

    if args.generate_keys:
        try:
            generate_keys(args.generate_keys)
        except (OSError, ValueError) as err:
            print(f"mixpipe serve: error: {err}", file=sys.stderr)
            return 2
        print(f"mixpipe serve: wrote server.key, server.key_secret, client.key and "
              f"client.key_secret to {args.generate_keys}; start the server with --keys "
              f"{args.generate_keys} and give clients keys={args.generate_keys!r} (or "
              f"MIXPIPE_KEYS)", flush=True)
        return 0
    if args.num_samples is None:
        print("mixpipe serve: error: --num-samples is required", file=sys.stderr)
        return 2
    service = None
    try:
        settings = _settings(args)
        service = InProcessService(args.num_samples, settings, seed=args.seed,
                                   state_dir=args.state_dir, ema_decay=args.ema_decay,
                                   fsync=args.fsync)
        server = SelectionServer(service, args.bind, keys=args.keys,
                                 allow_load_state=args.allow_load_state, insecure=args.insecure)
    except (TypeError, ValueError, OSError) as err:
        if service is not None:
            service.close()
        print(f"mixpipe serve: error: {err}", file=sys.stderr)
        return 2
    if args.state_dir is None:
        logging.getLogger(__name__).warning("no --state-dir: reports are not crash-safe")
    if not server.authenticated:
        logging.getLogger(__name__).warning("no keys: any local process can use this server "
                                            "(see --generate-keys / --keys)")

    def stop(signum: int, _frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stats = service.stats()
    print(f"mixpipe serve: listening on {server.endpoint} (samples={service.num_samples}, "
          f"policy={settings.name}, committed_epoch={stats['committed_epoch']}, "
          f"pending_losses={stats['pending_losses']}, "
          f"auth={'curve' if server.authenticated else 'none'})", flush=True)
    try:
        server.serve_forever()
    finally:
        service.close()
    return 0
