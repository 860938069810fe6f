"""What keeps a web browser from being turned against the server by a page on another site: the loopback
default needs no key, so the browser of anyone on this machine (or network) can reach it.

- **Host**: a DNS name the attacker controls, rebound to this machine's address, makes the attacker's page
  same-origin with the server; such a request still carries the attacker's name in ``Host``. Accepted: IP
  literals (a rebound request never carries one: the browser sends the name it resolved), ``localhost``, the
  ``--host`` bind name, the name the ASGI server gives itself, and ``--allowed-hosts``.
- **Origin**: browsers send it on every request but GET and HEAD; one that is not the server's own (as the
  client addressed it, in ``Host``) is a cross-site request. Clients that are not browsers send none.
- **Content-Type**: a form (or a ``no-cors`` fetch) can only send text/plain, form-urlencoded or multipart
  without asking the server first (a CORS preflight, which we never answer); JSON endpoints take JSON only.

No CORS headers are ever sent, so a foreign page cannot read what a GET answers either.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .config import ServerConfig
from .schemas import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # they change nothing: no Origin or body checks
JSON = ("application/json",)
JSONL = ("application/jsonl", "application/x-ndjson", "application/json")
# a form-urlencoded body cannot carry the image these endpoints need: the route refuses it, naming ``image``
MULTIPART = ("multipart/form-data", "application/x-www-form-urlencoded")
# the media types each path's body may have; any other path's body is JSON
BODY_TYPES = {"/v1/batches": JSONL, "/v1/images/edits": MULTIPART, "/v1/images/parameters": MULTIPART}
# raw-body clients (httpx ``content=``, requests ``data=``) send no Content-Type; a browser that sends such a
# body (a Blob without a type) also sends Origin, which is checked first
UNTYPED_BODY_PATHS = frozenset({"/v1/batches"})


def host_refusal(host: str, config: ServerConfig, server_name: str | None) -> ApiError | None:
    """``host``: the Host header ('' when absent: HTTP/1.0 clients, never a browser)."""
    if not host or host_allowed(hostname(host), config, server_name):
        return None
    return ApiError(400, f"Host {host[:100]!r} is not a name of this server: use its IP address or localhost, "
                         "or start it with --allowed-hosts NAME", "Host")


def origin_refusal(method: str, origin: str | None, host: str) -> ApiError | None:
    if method in SAFE_METHODS or origin is None or same_origin(origin, host):
        return None
    return ApiError(403, f"cross-origin request refused: Origin {origin[:100]!r} is not this server "
                         f"({host[:100] or 'no Host'}); a web page may only call the API from the server's own "
                         "pages (/ui)", "Origin")


def content_type_refusal(method: str, path: str, content_type: str, has_body: bool) -> ApiError | None:
    if method in SAFE_METHODS or not has_body:
        return None
    media = content_type.partition(";")[0].strip().lower()
    accepted = BODY_TYPES.get(path, JSON)
    if media in accepted or (not media and path in UNTYPED_BODY_PATHS):
        return None
    return ApiError(415, f"Content-Type {media or '(none)'} is not accepted by {method} {path}: send "
                         f"{' or '.join(accepted)}", "Content-Type")


def hostname(host: str) -> str:
    """The name in a Host header, without its port, lower case, without a trailing dot."""
    host = host.strip().lower()
    name = host[:host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
    return name.rstrip(".")


def host_allowed(name: str, config: ServerConfig, server_name: str | None) -> bool:
    if is_ip(name) or name in {"localhost", config.host.lower(), (server_name or "localhost").lower()}:
        return True
    return any(entry == "*" or name == entry or (entry.startswith("*.") and name.endswith(entry[1:]))
               for entry in (e.lower() for e in config.allowed_hosts))


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def same_origin(origin: str, host: str) -> bool:
    """Scheme aside (a TLS proxy in front sees https where the server sees http), the page's host and port
    are the ones the client addressed this request to. ``null`` (sandboxed frames, file: pages) is never."""
    parts = urlsplit(origin.strip())
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()
