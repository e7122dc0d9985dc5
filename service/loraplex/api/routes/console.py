"""GET /console: the tenant web console, static files shipped in the package (api/static/).

The page holds no data of its own: its ES modules call the public API with the key the user types
(kept in the tab's sessionStorage). Assets are served from a table built once from the package
directory, so a request names a key of that table, never a filesystem path. Every console response
carries a Content-Security-Policy that allows scripts, styles and connections from this origin only
(no inline script, no third-party origin).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}

router = APIRouter(tags=["console"], include_in_schema=False)


@lru_cache(maxsize=1)
def assets() -> dict[str, tuple[bytes, str]]:
    """`js/app.js` -> (content, media type), for every servable file under static/ (read once)."""
    table = {}
    for path in sorted(STATIC_DIR.rglob("*")):
        if path.is_file() and path.suffix in MEDIA_TYPES:
            table[path.relative_to(STATIC_DIR).as_posix()] = (path.read_bytes(), MEDIA_TYPES[path.suffix])
    return table


def _asset_response(name: str) -> Response:
    found = assets().get(name)
    if found is None:
        raise HTTPException(404, "Not Found")
    content, media_type = found
    return Response(content, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/console")
async def console_page() -> Response:
    return _asset_response("index.html")


@router.get("/console/static/{name:path}")
async def console_asset(name: str) -> Response:
    return _asset_response(name)
