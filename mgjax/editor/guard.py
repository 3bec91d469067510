"""Who may use the editor, as a pure ASGI middleware in front of every route: a local web tool is
reachable by every page its user visits, so each request is checked before any route runs.

- Host: a loopback name, the address the server was started on (with its names when that is a
  wildcard such as 0.0.0.0) or one given with --allowed_hosts. Anything else is refused (DNS
  rebinding: a foreign name resolved to 127.0.0.1 makes the attacker's page same-origin).
- Origin / Sec-Fetch-Site: an /api/ request that says it comes from another origin is refused,
  reads included (images, run files, events); a request without either header (curl, scripts)
  is allowed. POST bodies must say what they are: application/json, or an image for uploads
  (a cross-site form can send only text/plain, form-urlencoded and multipart without preflight).
- Token: when one is set (always when bound beyond loopback), every request carries it as the
  cookie the page gets from the printed URL's ?token=, an `Authorization: token ...` header or
  ?token= itself; Jupyter's model.
- Headers on every answer: a Content-Security-Policy allowing only the server's own scripts,
  styles and images (plus data: and blob: images, which the page draws), nosniff, no framing,
  no referrer.
"""

import dataclasses
import hmac
import ipaddress
import json
import secrets
import socket
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
IMAGE_TYPES = ("image/png", "image/jpeg")
UPLOAD_PATH = "/api/upload"


def is_loopback(host: str) -> bool:
    """Whether an address or name is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_hex(24)


@dataclasses.dataclass(frozen=True)
class Access:
    """Who may use the editor: the address it is bound to, extra Host names, the token."""

    host: str = "127.0.0.1"
    port: int = 8765
    allowed_hosts: tuple[str, ...] = ()
    token: str = ""  # "": no token (loopback only)

    def hosts(self) -> frozenset[str]:
        """The Host names (lower case, without port or brackets) requests may carry."""
        names = {*LOOPBACK_NAMES, *(h.lower().strip("[]") for h in self.allowed_hosts if h)}
        if self.host in WILDCARDS:  # reachable by the machine's names and addresses
            try:
                name, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
                names |= {name.lower(), *(a.lower() for a in aliases), *addresses}
                names.add(socket.getfqdn().lower())
            except OSError:
                pass
        else:
            names.add(self.host.lower().strip("[]"))
        return frozenset(names)

    @property
    def cookie(self) -> str:
        return f"mgjax-token-{self.port}"  # cookies are shared across ports: one per server


def for_bind(host: str, port: int, allowed_hosts=(), token: str | None = None) -> Access:
    """The Access of a server bound to host:port: a token is generated when the address is
    reachable beyond this machine and none is given."""
    if not token and not is_loopback(host):
        token = new_token()
    return Access(host, port, tuple(allowed_hosts), token or "")


def _split_host(value: str) -> str:
    """'Name:port' -> 'name'; '[::1]:8765' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The ASGI middleware: refuses with 403/415 and one sentence, adds the headers."""

    def __init__(self, app, access: Access):
        self.app, self.access, self.hosts = app, access, access.hosts()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the editor has no websockets
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refused = self.refusal(scope, headers)
        if refused:
            status, message = refused
            return await _answer(send, status, {"error": message})
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if self.access.token and query.get("token") and scope["method"] == "GET":
            # the printed URL: keep the token as a cookie, then show the page without it
            rest = urlencode({k: v for k, v in query.items() if k != "token"})
            cookie = f"{self.access.cookie}={self.access.token}; Path=/; HttpOnly; SameSite=Strict"
            location = scope["path"] + (f"?{rest}" if rest else "")
            extra = [(b"location", location.encode()), (b"set-cookie", cookie.encode())]
            return await _answer(send, 303, None, extra)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)

    def refusal(self, scope, headers: Headers) -> tuple[int, str] | None:
        """(status, sentence) when the request is refused, else None."""
        given = headers.getlist("host")
        if len(given) > 1:  # which one a proxy or a browser acted on cannot be known
            return 400, "a request names one host; send one Host header"
        host = _split_host(given[0] if given else "")
        if host not in self.hosts:
            return 403, (
                f"this editor does not answer to the host name {host or '(none)'!r}; open it "
                "at http://127.0.0.1 or start it with --allowed_hosts naming this host"
            )
        if self.access.token and not self._token_ok(scope, headers):
            return 403, (
                "this editor needs its token; open the URL with ?token= that the server "
                "printed when it started (or start it with --token)"
            )
        path, method = scope["path"], scope.get("method", "GET")
        if path.startswith("/api/") and self._cross_site(scope, headers):
            return 403, (
                "a request from another site is refused; use the editor's own page at "
                f"http://{headers.get('host', '')}/"
            )
        if method not in SAFE_METHODS:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if path == UPLOAD_PATH and kind not in IMAGE_TYPES:
                return 415, "an upload is sent as image/png or image/jpeg; choose a PNG or JPEG"
            if path != UPLOAD_PATH and kind != "application/json":
                return 415, "the request must be sent as application/json"
        return None

    def _token_ok(self, scope, headers: Headers) -> bool:
        want = self.access.token.encode()
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("token "):
            given.append(auth[6:].strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.access.cookie:
                given.append(value)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given.append(query.get("token", ""))
        return any(g and hmac.compare_digest(g.encode(), want) for g in given)

    def _cross_site(self, scope, headers: Headers) -> bool:
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
            return origin.lower() != own
        return headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


async def _answer(send, status: int, body: dict | None, extra: list | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
        *SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
