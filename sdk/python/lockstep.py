"""Lockstep connector SDK for Python (lockstep:connector@0.3.0).

`lockstep connector new --lang python` copies this file into your project beside app.py;
`lockstep connector build` turns app.py into a WebAssembly component with componentize-py.

Write a class named `Hooks` that subclasses `Connector` and define the hooks you need
(`on_login`, `on_logout`, `revoke`, `on_refresh`; the others succeed doing nothing). A hook
that returns succeeds; `raise Retry(msg)` asks the host to try again later (the legacy
system is down, timed out, answered 5xx); `raise Fail(msg)` fails for good (bad
configuration, 4xx). Any other exception becomes a `fail` with its message, never a trap,
so a bug costs one dead letter you can replay, not a crashed instance.
"""

import base64
import functools
import json as _json
import urllib.parse
from typing import Dict, Optional

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import host, outgoing_handler, signing, streams
from wit_world.imports import types as _http
from wit_world.imports.session import HookError_Fail, HookError_Retry, SessionEvent

__all__ = [
    "Connector", "Retry", "Fail", "SessionEvent", "config", "log", "cache", "http",
    "basic_auth", "path_segment", "sign_event", "SET_CONTENT_TYPE",
]

HOOKS = ("on_login", "on_logout", "revoke", "on_refresh")


class Retry(Exception):
    """Raise to ask the host for a retry (per the connector's failure policy)."""


class Fail(Exception):
    """Raise to fail the delivery for good (no retry)."""


def _guarded(hook):
    @functools.wraps(hook)
    def call(self, event: SessionEvent) -> None:
        try:
            hook(self, event)
        except Err:
            raise  # already a component-model error
        except Retry as e:
            raise Err(HookError_Retry(str(e)))
        except Fail as e:
            raise Err(HookError_Fail(str(e)))
        except Exception as e:  # a bug: a dead letter with its reason, not a trap
            raise Err(HookError_Fail(f"unexpected error: {type(e).__name__}: {e}"))

    return call


class Connector(exports.Hooks):
    """Base class of the `Hooks` class in app.py. Hooks you define are wrapped so whatever
    they raise becomes a delivery outcome."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in HOOKS:
            if name in cls.__dict__:
                setattr(cls, name, _guarded(cls.__dict__[name]))

    def on_login(self, event: SessionEvent) -> None:
        """A session began."""

    def on_logout(self, event: SessionEvent) -> None:
        """A session ended."""

    def revoke(self, event: SessionEvent) -> None:
        """A user's grants were revoked."""

    def on_refresh(self, event: SessionEvent) -> None:
        """A session's lifetime was extended (only if the manifest lists `refresh`)."""


class _Config:
    """The manifest's `[config]` table."""

    def get(self, key: str) -> Optional[str]:
        return host.config_get(key)

    def require(self, key: str) -> str:
        value = host.config_get(key)
        if not value:
            raise Fail(f"missing config key {key} (set it in the manifest's [config])")
        return value


class _Log:
    """Lines in the host's log, tagged with the connector and event (at most 100 per call)."""

    def trace(self, message: str) -> None:
        host.log(host.Level.TRACE, message)

    def debug(self, message: str) -> None:
        host.log(host.Level.DEBUG, message)

    def info(self, message: str) -> None:
        host.log(host.Level.INFO, message)

    def warn(self, message: str) -> None:
        host.log(host.Level.WARN, message)

    def error(self, message: str) -> None:
        host.log(host.Level.ERROR, message)


class _Cache:
    """A small in-memory store per connector version that outlives one call (an access
    token): at most 64 entries, 256-byte keys, 16 KiB values, 24 h."""

    def get(self, key: str) -> Optional[str]:
        return host.cache_get(key)

    def set(self, key: str, value: str, ttl_ms: int) -> None:
        host.cache_set(key, value, max(0, int(ttl_ms)))


config = _Config()
log = _Log()
cache = _Cache()

MAX_RESPONSE_BYTES = 64 * 1024


class Response:
    """A response with (up to 64 KiB of) its body read."""

    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return _json.loads(self.body)

    def error(self) -> Exception:
        """The error this status deserves: 5xx, 408 and 429 are worth a retry, others not."""
        message = f"HTTP {self.status}: {self.text[:200]}"
        if self.status >= 500 or self.status in (408, 429):
            return Retry(message)
        return Fail(message)


_METHODS = {
    "GET": _http.Method_Get, "HEAD": _http.Method_Head, "POST": _http.Method_Post,
    "PUT": _http.Method_Put, "DELETE": _http.Method_Delete, "PATCH": _http.Method_Patch,
    "OPTIONS": _http.Method_Options,
}


class _Http:
    """HTTP over wasi:http, to hosts the manifest's `allowed_hosts` allows. A network failure
    or timeout raises `Retry`; a destination the host refused raises `Fail` (the host log
    names it); any status comes back as a `Response` (raise `.error()` for the ones you do not
    expect)."""

    def request(self, method: str, url: str, headers: Optional[Dict[str, str]] = None,
                body: Optional[bytes] = None, json=None, timeout_ms: int = 5000) -> Response:
        headers = dict(headers or {})
        if json is not None:
            body = _json.dumps(json).encode()
            headers.setdefault("content-type", "application/json")
        # A declared length, even 0: a body of unknown length goes out chunked, and a server
        # that answers without reading it may close the connection while the final chunk is
        # in flight, which resets it and loses the answer.
        if not any(k.lower() == "content-length" for k in headers):
            headers["content-length"] = str(len(body or b""))
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Fail(f"not an http(s) URL: {url}")
        method_type = _METHODS.get(method.upper())
        request = _http.OutgoingRequest(_http.Fields.from_list(
            [(k.lower(), v.encode()) for k, v in headers.items()]))
        request.set_method(method_type() if method_type else _http.Method_Other(method))
        request.set_scheme(_http.Scheme_Http() if parts.scheme == "http" else _http.Scheme_Https())
        request.set_authority(parts.netloc)
        request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        outgoing = request.body()
        if body:
            with outgoing.write() as stream:
                for start in range(0, len(body), 4096):
                    stream.blocking_write_and_flush(body[start:start + 4096])
        _http.OutgoingBody.finish(outgoing, None)
        options = _http.RequestOptions()
        nanos = int(timeout_ms) * 1_000_000
        options.set_connect_timeout(nanos)
        options.set_first_byte_timeout(nanos)
        options.set_between_bytes_timeout(nanos)
        where = f"{method.upper()} {url}"
        try:
            future = outgoing_handler.handle(request, options)
        except Err as e:
            raise _transport_error(where, e.value)
        with future:
            with future.subscribe() as ready:
                ready.block()
            answer = future.get()
        if answer is None or isinstance(answer, Err):
            raise Retry(f"{where}: no response")
        inner = answer.value
        if isinstance(inner, Err):
            raise _transport_error(where, inner.value)
        with inner.value as response:
            status = response.status()
            with response.consume() as incoming:
                data = bytearray()
                with incoming.stream() as stream:
                    while len(data) < MAX_RESPONSE_BYTES:
                        try:
                            data += stream.blocking_read(MAX_RESPONSE_BYTES - len(data))
                        except Err as e:
                            if isinstance(e.value, streams.StreamError_Closed):
                                break
                            raise Retry(f"{where}: reading the response failed")
        return Response(status, bytes(data))


def _transport_error(where: str, code) -> Exception:
    if isinstance(code, _http.ErrorCode_HttpRequestDenied):
        return Fail(f"{where}: request denied by the host: destination not in allowed_hosts")
    return Retry(f"{where}: {type(code).__name__.removeprefix('ErrorCode_')}")


http = _Http()


SET_CONTENT_TYPE = "application/secevent+jwt"
"""The media type of a SET in an HTTP body."""


def sign_event(audience: str) -> str:
    """The event of the current hook call as a Security Event Token (RFC 8417, compact JWS)
    for `audience` (its `aud`), signed by Lockstep with its Shared Signals transmitter key;
    receivers verify it with Lockstep's public JWKS. The key never enters the component and
    the host builds the token from the event being delivered. The `jti` is the same on every
    redelivery. Raises `Fail` when the host signs nothing (no transmitter configured, a bad
    audience, more than four calls in one hook)."""
    try:
        return signing.sign_event(audience)
    except Err as e:
        raise Fail(f"signing the event failed: {e.value}")


def basic_auth(user: str, password: str) -> str:
    """`Basic base64(user:password)`, for legacy systems with HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def path_segment(text: str) -> str:
    """`text` percent-encoded for a URL path segment."""
    return urllib.parse.quote(text, safe="")
