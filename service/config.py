"""The one configuration object: command-line flags and ``DIGITSERVE_*`` environment variables.

Precedence: flag > environment > default. Validated once at start-up; a bad value stops the
service with a message that names the setting. ``service.cli`` builds the flags from the fields:
a new setting declares its ``--help`` group (and, where the type says too little, its metavar) with
``json_schema_extra=group("limits")`` next to its description; nothing else needs changing.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.device import Accelerator
from service.work import Pool

# The --help groups, in order, and what each holds.
GROUPS = {
    "server": "where it listens and how many processes answer",
    "model": "what it serves",
    "batching": "how requests are merged into model forwards",
    "limits": "the largest input it accepts, and how long anything may take",
    "security": "keys",
    "operations": "queues, connections, stopping, logs and capture",
}


def group(name: str, metavar: str | None = None) -> JsonDict:
    """A setting's ``--help`` group (a key of ``GROUPS``) and, optionally, its metavar."""
    if name not in GROUPS:
        raise ValueError(f"unknown settings group {name!r}: one of {', '.join(GROUPS)}")
    extra: JsonDict = {"group": name}
    if metavar:
        extra["metavar"] = metavar
    return extra


class Limits(BaseSettings):
    """Size limits on every input. Defaults are what a 2-core box survives comfortably."""

    model_config = SettingsConfigDict(env_prefix="DIGITSERVE_", extra="ignore")

    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body",
                                   json_schema_extra=group("limits", "BYTES"))
    max_instances: int = Field(64, ge=1, description="images in one request", json_schema_extra=group("limits"))
    max_image_pixels: int = Field(16_000_000, ge=1,
                                  description="width x height of one encoded image, checked from its header",
                                  json_schema_extra=group("limits"))
    max_image_side: int = Field(8192, ge=28, description="longest side of one encoded image",
                                json_schema_extra=group("limits", "PIXELS"))
    max_request_pixels: int = Field(
        64_000_000, ge=1, description="width x height summed over one request's images, checked from their headers "
                                      "before any is decoded", json_schema_extra=group("limits", "PIXELS"))
    max_ig_steps: int = Field(256, ge=1, description="most integrated-gradients steps one explain may ask for",
                              json_schema_extra=group("limits"))


class Settings(Limits):
    """Serve the digit classifier. Every flag is also an environment variable, DIGITSERVE_<FLAG> (e.g.
    --max-batch-size is DIGITSERVE_MAX_BATCH_SIZE); a flag wins over the environment."""

    model_config = SettingsConfigDict(env_prefix="DIGITSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="IP address or host name to bind (0.0.0.0 or :: for every interface)",
                      json_schema_extra=group("server"))
    port: int = Field(8000, ge=1024, le=65535, description="port to bind", json_schema_extra=group("server", "PORT"))
    grpc_port: int = Field(8001, ge=0, le=65535, description="port of the Open Inference Protocol's gRPC service "
                                                             "(as Triton's); 0 turns it off",
                           json_schema_extra=group("server", "PORT"))
    store: Path = Field(Path("model_store"), description="model store folder", json_schema_extra=group("model"))
    model: str = Field("mnist-fnn", min_length=1, description="model name in the store",
                       json_schema_extra=group("model", "NAME"))
    model_version: int | None = Field(
        None, ge=1, description="serve this version (unset: the highest that verifies and passes --min-accuracy)",
        json_schema_extra=group("model", "N"))
    min_accuracy: float = Field(
        0.0, ge=0, le=1, description="never serve a version whose recorded test accuracy is lower unless it is "
                                     "pinned or an admin call asks (start-up and the store watcher)",
        json_schema_extra=group("model", "0..1"))
    watch_store_s: float = Field(
        0.0, ge=0, le=3600, description="poll the store this often and serve a new highest version that verifies "
                                        "(0: off)", json_schema_extra=group("model"))
    max_loaded_versions: int = Field(2, ge=1, le=8, description="model versions held at once in every worker",
                                     json_schema_extra=group("model"))
    not_a_digit_below: float = Field(
        0.01, ge=0, le=1, description="flag an answer not_a_digit when its typicality is below this: about this "
                                      "share of real digits is flagged (docs/typicality.md; 0: never)",
        json_schema_extra=group("model", "0..1"))
    admin_key: SecretStr | None = Field(
        None, description="turns the admin API on (/admin, /v2/repository); send it as X-Admin-Key or "
                          "Authorization: Bearer (never logged)", json_schema_extra=group("security"))
    accelerator: Accelerator = Field("auto", description="where the model runs", json_schema_extra=group("model"))
    runtime: Literal["eager", "export"] = Field(
        "eager", description="eager: the PyTorch module; export: each version's static graph (python -m "
                             "service.export), served only once it matches the eager module on real digits, else "
                             "that version serves eager (/info says why); /explain is always eager",
        json_schema_extra=group("model"))
    max_batch_size: int = Field(64, ge=1, le=4096, description="most requests merged into one model forward",
                                json_schema_extra=group("batching"))
    batch_timeout_ms: float = Field(
        5.0, ge=0, le=1000,
        description="how long a worker may wait for more requests while more are in flight than it has collected "
                    "(a lone request never waits; 0: batch only what is queued)",
        json_schema_extra=group("batching"))
    workers: int = Field(1, ge=1, le=64, description="predict workers per device", json_schema_extra=group("server"))
    explain_workers: int = Field(1, ge=1, le=64, description="explain workers per device",
                                 json_schema_extra=group("server"))
    api_servers: int = Field(2, ge=1, le=64, description="HTTP (uvicorn) processes; they decode and preprocess too",
                             json_schema_extra=group("server"))
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request still unanswered after this gets 504",
                                     json_schema_extra=group("limits"))
    max_queued_requests: int = Field(
        512, ge=1, le=100_000, description="requests admitted but not yet answered, all API servers; past it: 503",
        json_schema_extra=group("operations"))
    max_queue_wait_ms: float = Field(
        200, gt=0, le=600_000, description="refuse a /predict request (503) that would wait longer than this",
        json_schema_extra=group("operations"))
    explain_max_queue_wait_ms: float = Field(
        2000, gt=0, le=600_000, description="refuse an /explain request (503) that would wait longer than this",
        json_schema_extra=group("operations"))
    read_timeout_s: float = Field(
        10, gt=0, le=3600, description="a request's headers and body must arrive within this (408 and close)",
        json_schema_extra=group("limits"))
    keep_alive_s: float = Field(
        75, gt=0, le=3600,
        description="an idle keep-alive connection is closed after this; keep it above the idle timeout of the clients "
                    "and load balancers in front (httpx 5 s, AWS ALB 60 s), or they reuse a connection being closed",
        json_schema_extra=group("operations"))
    max_connections: int = Field(
        1024, ge=1, le=100_000, description="open connections per API server; past it a 503 and close",
        json_schema_extra=group("operations"))
    max_connections_per_client: int = Field(
        0, ge=0, le=100_000,
        description="open connections from one client address per API server; past it a 503 and close (0: no "
                    "limit; behind a load balancer or NAT many clients share an address)",
        json_schema_extra=group("operations"))
    api_key: SecretStr | None = Field(None, description="when set, /predict and /explain require it (never logged)",
                                      json_schema_extra=group("security"))
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600,
                                    description="on SIGTERM, how long in-flight requests may finish",
                                    json_schema_extra=group("operations"))
    drain_delay_s: float = Field(
        5.0, ge=0, le=600,
        description="on SIGTERM, how long /health answers 503 while requests are still served, so load balancers "
                    "stop sending before anything is refused (0: refuse at once)",
        json_schema_extra=group("operations"))
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log verbosity", json_schema_extra=group("operations"))
    log_format: Literal["text", "json"] = Field(
        "text", description="every log line as text, or as one JSON object (for log collectors)",
        json_schema_extra=group("operations"))
    capture_dir: Path | None = Field(
        None, description="keep a sample of the frames the model saw and its answers in rotating files here, for "
                          "python -m service.replay (unset: off; docs/capture.md)",
        json_schema_extra=group("operations", "DIR"))
    capture_share: float = Field(
        0.01, ge=0, le=1, description="share of the instances with a digit that --capture-dir keeps (1: all)",
        json_schema_extra=group("operations", "0..1"))
    capture_max_mb: int = Field(
        256, ge=1, le=1_000_000, description="most MiB of capture files in --capture-dir, every API server's "
                                             "together; past it the oldest files are deleted",
        json_schema_extra=group("operations", "MB"))

    @field_validator("host")
    @classmethod
    def _address(cls, host: str) -> str:
        try:
            bind_address(host)
        except socket.gaierror:
            raise ValueError(f"{host!r} is neither an IP address nor a host name this machine resolves "
                             "(e.g. 127.0.0.1, 0.0.0.0, ::, localhost)") from None
        return host

    def bind_address(self) -> str:
        """The IP address ``--host`` names (a host name resolved once)."""
        return bind_address(self.host)

    @field_validator("api_key", "admin_key")
    @classmethod
    def _not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("is empty: unset it to turn the key off, or set a key (an empty one would let anyone in)")
        return key

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.batch_timeout_ms / 1000 >= self.request_timeout_s:
            raise ValueError("batch-timeout-ms must be shorter than request-timeout-s")
        if self.grpc_port == self.port:
            raise ValueError(f"grpc-port must differ from port ({self.port}): HTTP and gRPC each need their own")
        if self.admin_key is not None and self.api_key is not None and (
                self.admin_key.get_secret_value() == self.api_key.get_secret_value()):
            raise ValueError("admin-key must differ from api-key: a client's key must not change what is served")
        return self

    def pools(self) -> dict[Pool, int]:
        """The worker pools and how many workers each runs (per device)."""
        return {Pool.PREDICT: self.workers, Pool.EXPLAIN: self.explain_workers}

    def max_queue_wait_s(self, pool: Pool) -> float:
        """How long a request of ``pool`` may wait for a worker before admission refuses it."""
        return (self.max_queue_wait_ms if pool is Pool.PREDICT else self.explain_max_queue_wait_ms) / 1000


@functools.lru_cache(maxsize=8)
def bind_address(host: str) -> str:
    """``host`` as an IP address: itself, or the first address a host name resolves to, IPv4 first (so that
    ``localhost`` is 127.0.0.1, which every client tries, where it also resolves to ::1)."""
    with contextlib.suppress(ValueError):  # not an address: a host name
        return str(ipaddress.ip_address(host))
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return str(sorted(found, key=lambda entry: entry[0] != socket.AF_INET)[0][4][0])
