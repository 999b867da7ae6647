"""Server configuration: every knob with a safe default, settable by flag or environment.

Each field ``name`` reads the environment variable ``GRADSERVE_<NAME>`` and the flag
``--<name>`` (dashes for underscores); a flag wins over the environment, which wins over the
default. The batching knobs follow Triton's and TF Serving's.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TypeVar

from gradserve.engine import Limits

T = TypeVar("T")
ENGINE = Limits()  # the engine's own defaults


class ConfigError(ValueError):
    """Settings the server cannot start with (safely); the message says which and why."""


def setting(default: T, doc: str, choices: tuple[str, ...] = ()) -> T:
    """A configuration field with its one-line description (shown by --help and the docs) and,
    for a word, the words it may be."""
    value: T = field(default=default, metadata={"help": doc, "choices": choices})
    return value


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What ``gradserve serve`` runs with."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(50051, "gRPC port (0: any free port)")
    workers: int = setting(1, "server processes sharing the port (SO_REUSEPORT), each with "
                           "its own batcher and its metrics on --metrics-port plus its index")
    reuse_port: bool = setting(False, "let other processes bind the same port "
                               "(SO_REUSEPORT; set for each of --workers)")
    metrics_port: int = setting(9464, "Prometheus /metrics HTTP port on host (0: any free "
                                "port; -1: off)")
    max_batch_size: int = setting(4096, "most examples one engine pass may stack")
    max_queue_delay_us: int = setting(2000, "the longest a batch may wait for more requests, "
                                      "in microseconds (0: never waits)")
    batch_wait: str = setting("adaptive", "adaptive: a batch waits for more requests only "
                              "while the server is busy and more callers are about, never "
                              "past --max-queue-delay-us; fixed: it always waits that long "
                              "(Triton's and TF Serving's way)", choices=("adaptive", "fixed"))
    max_queue_size: int = setting(1024, "most queued requests; beyond, RESOURCE_EXHAUSTED "
                                  "at once")
    batch_threads: int = setting(2, "engine threads: large passes at once (numpy releases "
                                 "the GIL in large ops)")
    inline_max_elements: int = setting(1 << 16, "a pass of at most this many elements "
                                       "(examples x elements per example) runs on the event "
                                       "loop, which is faster than handing it to an engine "
                                       "thread; 0: every pass on a thread")
    max_message_bytes: int = setting(64 << 20, "largest gRPC message received or sent")
    malloc_retain_bytes: int = setting(0, "glibc: serve allocations up to this size from "
                                       "one heap for all threads, and keep up to this much "
                                       "freed memory for reuse rather than hand it back; a "
                                       "large tensor then reuses pages instead of having the "
                                       "kernel zero fresh ones (about 3x faster per copy at 80 "
                                       "MB), but the process's memory stays near its peak; "
                                       "0: the C library's defaults")
    # The engine's limits, with the engine's defaults.
    max_nodes: int = setting(ENGINE.max_nodes, "most nodes per graph")
    max_name_length: int = setting(ENGINE.max_name_length, "most characters in a name (of a "
                                   "value, an op or an attribute)")
    max_tensor_elements: int = setting(ENGINE.max_elements, "most elements of any tensor, per "
                                       "example")
    max_request_elements: int = setting(1 << 26, "most elements of a request's inputs and "
                                        "upstream gradients together")
    max_decode_bytes: int = setting(256 << 20, "most bytes a request's tensors may take once "
                                    "decoded: their values, and 1 KiB of objects per tensor; "
                                    "estimated from the message before anything is decoded, "
                                    "and a request over it is refused (RESOURCE_EXHAUSTED)")
    max_stream_buffer_bytes: int = setting(64 << 20, "most bytes of answers one stream may "
                                           "hold, being computed or not yet read by its client "
                                           "(each answer's size is known before it is "
                                           "computed); a stream over it reads no more requests "
                                           "until answers are sent")
    max_compute_seconds: float = setting(20.0, "longest engine run (or gradient check); a "
                                         "longer one stops with RESOURCE_EXHAUSTED; keep it "
                                         "under --grace-seconds, so a call in flight at "
                                         "shutdown can finish")
    plan_cache_size: int = setting(256, "compiled plans kept (least recently used go first)")
    plan_cache_nodes: int = setting(400_000, "most graph nodes the cached plans hold together "
                                    "(a plan takes about 2 KB a node); the newest plan is "
                                    "kept whatever its size")
    grace_seconds: float = setting(25.0, "how long calls in flight may finish on shutdown; "
                                   "then what still runs is abandoned and the process exits "
                                   "(a container's stop timeout should exceed it)")
    tls_cert: str = setting("", "PEM certificate chain: serve TLS only (with --tls-key)")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA certificates: demand a client certificate they "
                                 "signed (mutual TLS)")
    auth_tokens: str = setting("", "comma-separated bearer tokens a call must carry one of "
                               "(health checks exempt); give them by environment, not flag")
    auth_token_file: str = setting("", "a file of accepted bearer tokens, one per line")
    log_json: bool = setting(False, "log one JSON object per line")

    @property
    def limits(self) -> Limits:
        """The engine limits these settings imply."""
        return Limits(max_nodes=self.max_nodes, max_elements=self.max_tensor_elements,
                      max_name_length=self.max_name_length)

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
                                    default=str(default).lower() in ("1", "true", "yes"),
                                    help=f"{f.metadata['help']} (GRADSERVE_{f.name.upper()})")
            else:
                kind = {"int": int, "float": float, "str": str}[str(f.type)]
                parser.add_argument(flag, type=kind, default=kind(default),
                                    choices=f.metadata["choices"] or None,
                                    help=f"{f.metadata['help']}; default {f.default} "
                                    f"(GRADSERVE_{f.name.upper()})")

    def check_choices(self) -> None:
        """A ConfigError for a word setting that is not one of its choices (a variable's value
        is not checked by the flag parser)."""
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of "
                                  f"{', '.join(choices)}, not {value!r}")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServerConfig:
        """The settings in a parsed namespace (extra attributes are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
