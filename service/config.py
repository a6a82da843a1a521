"""The one configuration object: command-line flags and ``DIGITSERVE_*`` environment variables.

Precedence: flag > environment > default. Validated once at start-up; a bad value stops the
service with a message that names the setting.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.device import Accelerator


class Limits(BaseSettings):
    """Size limits on every input. Defaults are what a 2-core box survives comfortably."""

    model_config = SettingsConfigDict(env_prefix="DIGITSERVE_", extra="ignore")

    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body")
    max_instances: int = Field(64, ge=1, description="images in one request")
    max_image_pixels: int = Field(16_000_000, ge=1,
                                  description="width x height of one encoded image, checked from its header")
    max_image_side: int = Field(8192, ge=28, description="longest side of one encoded image")
    max_ig_steps: int = Field(256, ge=1, description="most integrated-gradients steps one explain may ask for")


class Settings(Limits):
    """Serve the digit classifier. Every flag is also an environment variable, DIGITSERVE_<FLAG> (e.g.
    --max-batch-size is DIGITSERVE_MAX_BATCH_SIZE); a flag wins over the environment."""

    model_config = SettingsConfigDict(
        env_prefix="DIGITSERVE_",
        extra="ignore",
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_exit_on_error=False,  # one clear line from service.__main__ instead of argparse's usage dump
    )

    host: str = Field("127.0.0.1", description="IP address to bind (0.0.0.0 or :: for every interface)")
    port: int = Field(8000, ge=1024, le=65535, description="port to bind")
    store: Path = Field(Path("model_store"), description="model store folder")
    model: str = Field("mnist-fnn", min_length=1, description="model name in the store")
    version: int | None = Field(
        None, ge=1, description="serve this version (unset: the highest that verifies and passes --min-accuracy)")
    min_accuracy: float = Field(
        0.0, ge=0, le=1, description="never serve a version whose recorded test accuracy is lower unless it is "
                                     "pinned or an admin call asks (start-up and the store watcher)")
    watch_store_s: float = Field(
        0.0, ge=0, le=3600, description="poll the store this often and serve a new highest version that verifies "
                                        "(0: off)")
    max_loaded_versions: int = Field(2, ge=1, le=8, description="model versions held at once in every worker")
    not_a_digit_below: float = Field(
        0.01, ge=0, le=1, description="flag an answer not_a_digit when its typicality is below this: about this "
                                      "share of real digits is flagged (docs/typicality.md; 0: never)")
    admin_key: SecretStr | None = Field(
        None, description="turns the admin API on (/admin, /v2/repository); send it as X-Admin-Key or "
                          "Authorization: Bearer (never logged)")
    accelerator: Accelerator = Field("auto", description="auto | cpu | cuda")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most requests merged into one model forward")
    batch_timeout_ms: float = Field(
        5.0, ge=0, le=1000,
        description="how long a worker may wait for more requests while more are in flight than it has collected "
                    "(a lone request never waits; 0: batch only what is queued)",
    )
    workers: int = Field(1, ge=1, le=64, description="predict workers per device")
    explain_workers: int = Field(1, ge=1, le=64, description="explain workers per device")
    api_servers: int = Field(2, ge=1, le=64, description="HTTP (uvicorn) processes; they decode and preprocess too")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request still unanswered after this gets 504")
    max_queued_requests: int = Field(
        512, ge=1, le=100_000, description="requests admitted but not yet answered, all API servers; past it: 503"
    )
    max_queue_wait_ms: float = Field(
        200, gt=0, le=600_000, description="refuse a /predict request (503) that would wait longer than this")
    explain_max_queue_wait_ms: float = Field(
        2000, gt=0, le=600_000, description="refuse an /explain request (503) that would wait longer than this")
    read_timeout_s: float = Field(
        10, gt=0, le=3600, description="a request's headers and body must arrive within this (408 and close)")
    keep_alive_s: float = Field(
        75, gt=0, le=3600,
        description="an idle keep-alive connection is closed after this; keep it above the idle timeout of the clients "
                    "and load balancers in front (httpx 5 s, AWS ALB 60 s), or they reuse a connection being closed")
    max_connections: int = Field(
        1024, ge=1, le=100_000, description="open connections per API server; past it a 503 and close")
    max_connections_per_client: int = Field(
        0, ge=0, le=100_000,
        description="open connections from one client address per API server; past it a 503 and close (0: no "
                    "limit; behind a load balancer or NAT many clients share an address)")
    api_key: SecretStr | None = Field(None, description="when set, /predict and /explain require it (never logged)")
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600,
                                    description="on SIGTERM, how long in-flight requests may finish")
    drain_delay_s: float = Field(
        5.0, ge=0, le=600,
        description="on SIGTERM, how long /health answers 503 while requests are still served, so load balancers "
                    "stop sending before anything is refused (0: refuse at once)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log verbosity")

    @field_validator("host")
    @classmethod
    def _ip_address(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::, 192.168.1.10)") from None
        return host

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.batch_timeout_ms / 1000 >= self.request_timeout_s:
            raise ValueError("batch-timeout-ms must be shorter than request-timeout-s")
        if self.admin_key is not None and self.api_key is not None and (
                self.admin_key.get_secret_value() == self.api_key.get_secret_value()):
            raise ValueError("admin-key must differ from api-key: a client's key must not change what is served")
        return self

    def pools(self) -> dict[str, int]:
        """The worker pools, by route, and how many workers each runs (per device)."""
        return {"/predict": self.workers, "/explain": self.explain_workers}
