"""OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

    curl -i localhost:8000/v1/completions -d '{"model": "nope", "prompt": "x"}'   # 404 body

`APIError` is raised anywhere in the request path (ingress or model replica) and crosses Ray
process boundaries intact, so the ingress turns it into the same JSON wherever it started.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (documented in the OpenAPI schema)."""

    error: ErrorDetail


class APIError(Exception):
    """An error the client caused or must react to (retry later, fix the request)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(status, message, type, param, code, retry_after_s)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after_s + 0.999)))}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


def from_validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the offending field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        return APIError(400, message, param=param, code="unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: {param}", param=param, code="missing")
    where = f"{param}: " if param else ""
    return invalid_request(f"Invalid request: {where}{message}", param=param)


def overloaded(message: str, status: int = 503, retry_after_s: float | None = 1.0) -> APIError:
    kind = "rate_limit_error" if status == 429 else "server_error"
    return APIError(status, message, type=kind, code="overloaded", retry_after_s=retry_after_s)


def internal_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def unwrap(err: BaseException) -> BaseException:
    """The original exception inside Ray's RayTaskError wrappers."""
    seen = 0
    while seen < 8 and getattr(err, "cause", None) is not None:
        err = err.cause  # type: ignore[attr-defined]
        seen += 1
    return err
