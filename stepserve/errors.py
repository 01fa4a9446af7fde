"""Errors that reach a client, each with its OpenAI error body and HTTP status."""

from __future__ import annotations


class StepserveError(Exception):
    status_code = 500
    error_type = "InternalServerError"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Keeps `param` when the error crosses a process boundary (image workers).
        return type(self), (self.message, self.param)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status_code}}


class InvalidRequestError(StepserveError):
    status_code = 400
    error_type = "BadRequestError"


class AuthenticationError(StepserveError):
    status_code = 401
    error_type = "AuthenticationError"


class NotFoundError(StepserveError):
    status_code = 404
    error_type = "NotFoundError"


class PayloadTooLargeError(StepserveError):
    status_code = 413
    error_type = "PayloadTooLargeError"


class ServiceUnavailableError(StepserveError):
    status_code = 503
    error_type = "ServiceUnavailableError"


class ModelLoadError(StepserveError):
    """The checkpoint cannot be loaded (missing/unexpected tensors, bad config)."""
