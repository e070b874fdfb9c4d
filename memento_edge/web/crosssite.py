"""Cross-site request refusal for every state-changing route (REST and MCP alike).

A page on another origin can make the owner's browser send a POST to this service: ``text/plain``,
form and multipart bodies go out without a CORS preflight, and in the no-token loopback mode nothing else
stands in the way (a page stored a memory - a persistent prompt injection - that way). Two independent
checks close it: browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``) and only
"same origin" or "no browser context" passes; and bodies must be JSON or NDJSON, which a cross-site page
cannot send without a preflight this service never grants. Agents and curl send neither header.
"""
from __future__ import annotations

from typing import Collection
from urllib.parse import urlsplit

from flask import Request

from .errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# "none": the user typed the URL or used a bookmark; "same-origin": the service's own page.
_ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})


def check_cross_site(request: Request, allowed_origins: Collection[str] = ()) -> None:
    """Raise 403 when a state-changing request comes from a page of another origin (one of
    ``allowed_origins`` - exact ``scheme://host[:port]`` - counts as this service's own)."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    same_origin = origin is not None and (origin in allowed_origins or _origin_is_host(origin, request.host))
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in _ALLOWED_FETCH_SITES and not same_origin:
        raise _refuse(f"Sec-Fetch-Site: {fetch_site[:40]}")
    if origin is not None and not same_origin:
        raise _refuse(f"Origin: {origin[:100]}")


def _origin_is_host(origin: str, host: str) -> bool:
    """Whether ``origin`` (scheme://host[:port]) names this service as the browser addressed it (Host)."""
    if origin == "null":  # sandboxed frames, file: pages, redirects across origins
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        return False
    # Ports compared explicitly: the scheme's default port may be left out on either side. The scheme
    # itself is not compared: one host:port is one server (a TLS proxy in front makes them differ).
    return _with_port(parts.netloc, parts.scheme) == _with_port(host, parts.scheme)


def _with_port(hostport: str, scheme: str) -> str:
    hostport = hostport.lower()
    if ":" in hostport.rsplit("]", 1)[-1]:  # "name:8077", "[::1]:8077"
        return hostport
    return f"{hostport}:{443 if scheme == 'https' else 80}"


def _refuse(seen: str) -> ApiError:
    return ApiError(403, "cross_site", f"cross-site request refused ({seen}): state-changing requests must "
                    "come from this service's own page or from a client that is not a browser")
