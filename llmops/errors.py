"""One error hierarchy for every llmops service, in OpenAI's terms: each error knows its HTTP
status and the `type`, `code` and `param` of OpenAI's error envelope. Domain code raises these;
the gateway maps them to responses in one place (`gateway.http.errors`)."""

from __future__ import annotations

import orjson

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InsufficientStorageError",
    "ModelNotFoundError",
    "NoHealthyBackendError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "error_body",
]


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code
        if type_ is not None:
            self.type = type_



class BadRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(APIError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class RequestTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(APIError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ServiceUnavailableError(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InsufficientStorageError(APIError):
    status = 507
    type = "server_error"
    code = "insufficient_storage"


class NoHealthyBackendError(APIError):
    status = 503
    type = "server_error"
    code = "no_healthy_backend"


class UpstreamTimeoutError(APIError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
