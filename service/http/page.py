"""The page at ``/``: draw a digit, see the prediction and why, watch the service.

Static files shipped inside the package (``service/http/page/``), read once at import. The page
calls the same endpoints a client would (/predict, /explain, /info, /metrics) from its own
origin, so it can run under a strict Content-Security-Policy: no inline script or style, nothing
from another origin. Only the fixed set of files below is served; any other name is a 404.

Caching: the HTML is revalidated on every load (``no-cache`` + ETag); it names each asset with a
digest of its content (``/page/app.js?v=<digest>``), and an asset asked for by its current digest
is cached for a year (``immutable``), so a new release is picked up at the next load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from service.errors import HttpError

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class File:
    body: bytes
    media_type: str
    digest: str  # of the content: the ETag, and the ``v`` the page names the asset with

    @classmethod
    def of(cls, body: bytes, media_type: str) -> File:
        return cls(body, media_type, hashlib.sha256(body).hexdigest()[:16])

    def response(self, request: Request, cache_control: str) -> Response:
        etag = f'"{self.digest}"'
        headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": etag}
        if etag in [tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def _read(name: str) -> bytes:
    return resources.files("service.http").joinpath("page", name).read_bytes()


def _load() -> tuple[File, dict[str, File]]:
    assets = {name: File.of(_read(name), media_type) for name, media_type in ASSET_TYPES.items()}
    html = _read("index.html").decode()
    for name, asset in assets.items():  # {{app.js}} -> /page/app.js?v=<digest>
        html = html.replace("{{" + name + "}}", f"/page/{name}?v={asset.digest}")
    return File.of(html.encode(), "text/html; charset=utf-8"), assets


INDEX, ASSETS = _load()


async def index(request: Request) -> Response:
    """``GET /``: the page."""
    return INDEX.response(request, REVALIDATE)


async def asset(request: Request) -> Response:
    """``GET /page/{name}``: one of the page's files, by its exact name; anything else is a 404."""
    found = ASSETS.get(request.path_params.get("name", ""))
    if found is None:
        raise HttpError(404, "Not Found")
    fresh = request.query_params.get("v") == found.digest
    return found.response(request, IMMUTABLE if fresh else REVALIDATE)
