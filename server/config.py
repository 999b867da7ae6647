"""Server configuration: every knob with a safe default, settable by flag or environment.

Each field ``name`` reads the environment variable ``GRADSERVE_<NAME>`` and the flag
``--<name>`` (dashes for underscores); a flag wins over the environment, which wins over the
default. The batching knobs follow Triton's and TF Serving's.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from gradserve.engine import Limits


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What ``gradserve serve`` runs with."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # Prometheus /metrics over HTTP on host; 0 any free port; -1 off
    max_batch_size: int = 4096  # examples one batched engine run may stack
    max_queue_delay_us: int = 0  # how long a batch may wait for more requests (0: none)
    max_queue_size: int = 1024  # queued requests; beyond it, RESOURCE_EXHAUSTED at once
    batch_threads: int = 2  # engine runs at once (numpy releases the GIL in large ops)
    rpc_threads: int = 32  # gRPC handler threads
    max_message_bytes: int = 64 << 20  # gRPC receive and send limit
    max_nodes: int = 100_000  # nodes per graph
    max_tensor_elements: int = 1 << 24  # elements of any tensor, per example
    max_request_elements: int = 1 << 26  # elements of all inputs of a request together
    plan_cache_size: int = 256  # compiled plans kept (least recently used go first)
    grace_seconds: float = 10.0  # how long in-flight calls may finish on shutdown
    log_json: bool = False  # structured (JSON) log lines

    @property
    def limits(self) -> Limits:
        """The engine limits these settings imply."""
        return Limits(max_nodes=self.max_nodes, max_elements=self.max_tensor_elements)

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None,
              environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Settings from ``argv`` flags over ``GRADSERVE_*`` variables over the defaults."""
        env = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(prog="gradserve serve",
                                         description="Run the gradserve gRPC server.")
        cls.add_arguments(parser, env)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
        """Add one flag per field, defaulting to its GRADSERVE_* variable or built-in value."""
        for f in fields(cls):
            default = env.get(f"GRADSERVE_{f.name.upper()}", f.default)
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                    default=str(default).lower() in ("1", "true", "yes"))
            else:
                kind = {"int": int, "float": float, "str": str}[str(f.type)]
                parser.add_argument(flag, type=kind, default=kind(default),
                                    help=f"default {f.default} (GRADSERVE_{f.name.upper()})")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServerConfig:
        """The settings in a parsed namespace (extra attributes are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
