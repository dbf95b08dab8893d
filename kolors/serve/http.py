"""The HTTP plumbing every route shares: errors in OpenAI's shape on /v1/ and FastAPI's elsewhere, each naming
its field; the body limit, enforced as the body arrives; the API key; and the guard against other web sites.

The guard (Guard, outermost) runs before any route or body parsing:
- without an API key, only loopback Host values (localhost, *.localhost, 127.0.0.0/8, ::1) and the
  --allowed-host names are answered: a web page that points its own name at 127.0.0.1 (DNS rebinding) gets 421;
- a state-changing request (not GET, HEAD or OPTIONS) that a browser marks as coming from another site
  (Sec-Fetch-Site other than same-origin or none, or an Origin other than this server's) gets 403; there are no
  CORS headers, so other sites cannot read answers either (JSON bodies need a JSON content type: FastAPI's own);
- with an API key, an API call without it gets 401 before its body is read;
- every request is logged, with its status and time, on the "kolors.server" logger (the access log).

OpenAI routes (/v1/...) answer errors as {"error": {"message", "type", "param"}} with 400; the others as
{"detail": "..."} with 422.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from kolors.errors import KolorsError
from kolors.serve.schemas import Detail, OpenAIError, RequestError

log = logging.getLogger("kolors.server")


def error_response(
    request: Request, status: int, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    if not request.url.path.startswith("/v1/"):
        return JSONResponse({"detail": message}, status, headers=headers)
    status = 400 if status == 422 else status  # OpenAI answers every malformed request 400
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    kind = "server_error" if status >= 500 else kind
    body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    return JSONResponse(body, status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line, each naming its field: "steps: Input should be a valid integer"."""
    parts, fields = [], []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        name, msg = (".".join(loc) or "body"), e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            name, msg = "body", f"not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        elif e.get("type") == "missing" and name == "body":
            msg = "a request body is required"
        parts.append(f"{name}: {msg}")
        fields.append(name)
    return "; ".join(parts), (fields[0] if fields else None)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, field = _validation_message(list(exc.errors()))
        return error_response(request, 422, message, field)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return error_response(request, exc.status, str(exc), exc.field)

    @app.exception_handler(KolorsError)
    async def on_kolors_error(request: Request, exc: KolorsError):
        return error_response(request, 422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):  # a last resort: the tests find none
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal server error; the server log has the details")


def error_docs(model: type[BaseModel], *codes: int) -> dict:
    """The error answers of a route, for the OpenAPI schema."""
    text = {
        400: "a malformed request (the message names the field)",
        401: "missing or wrong API key",
        404: "no such image, or it expired",
        409: "interrupted before any image was finished",
        413: "the request body or image is over the upload limit",
        422: "a malformed request (the message names the field)",
        429: "the queue is full: retry after Retry-After seconds",
        500: "a bug: the server log has the details",
        503: "the device ran out of memory, the server is shutting down, or its replicas died during the job",
    }
    return {code: {"model": model, "description": text[code]} for code in codes}


A1111_ERRORS = error_docs(Detail, 409, 413, 422, 429, 503)
OPENAI_ERRORS = error_docs(OpenAIError, 400, 409, 413, 429, 503)


class BodyTooLarge(HTTPException):
    """Raised while a body is read: FastAPI passes HTTPExceptions from reading the body on as they are."""


class BodyLimit:
    """ASGI middleware: a request body over the limit is refused (413) as it arrives, before it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_large = BodyTooLarge(413, f"request body over this server's limit of {self.max_bytes >> 20} MB")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


bearer = HTTPBearer(auto_error=False, description="the server's --api-key")


def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """With an API key configured, every API call carries it as a Bearer token."""
    key = request.app.state.config.api_key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key; send the header Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
KEYED_PREFIXES = ("/v1/", "/sdapi/")  # the API; /v1/files/ is open (the URL is the secret)


def host_name(host: str) -> str:
    """The name in a Host header, without its port or brackets, lower case: "[::1]:7860" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(
        ".localhost"
    ):  # browsers resolve *.localhost to loopback themselves
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def key_matches(headers: dict[bytes, bytes], key: str) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


class Guard:
    """ASGI middleware: Host, cross-site and API-key checks before anything else runs, and the access log."""

    def __init__(self, app, api_key: str | None, allowed_hosts: tuple[str, ...] = ()):
        self.app, self.api_key = app, api_key
        self.allowed_hosts = {host_name(h) for h in allowed_hosts}

    def refusal(self, scope) -> tuple[int, str, dict | None] | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.api_key is None and host:
            name = host_name(host)
            if not is_loopback(name) and name not in self.allowed_hosts and "*" not in self.allowed_hosts:
                return (
                    421,
                    f"host {name!r} is not served here; start the server with --allowed-host {name}",
                    None,
                )
        if scope["method"] not in SAFE_METHODS:
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1").lower()
            if site and site not in ("same-origin", "none"):
                return 403, f"cross-site requests are refused (Sec-Fetch-Site: {site})", None
            if origin and origin.partition("://")[2] != host.lower():
                return 403, f"cross-site requests are refused (Origin: {origin})", None
        path = scope["path"]
        if (
            self.api_key is not None
            and path.startswith(KEYED_PREFIXES)
            and not path.startswith("/v1/files/")
            and not key_matches(headers, self.api_key)
        ):
            message = "missing or wrong API key; send the header Authorization: Bearer <key>"
            return 401, message, {"WWW-Authenticate": "Bearer"}
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is None:
                await self.app(scope, receive, logged_send)
            else:
                code, message, headers = refused
                response = error_response(StarletteRequest(scope), code, message, headers=headers)
                await response(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                '%s "%s %s" %d %.0f ms',
                client[0],
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )
