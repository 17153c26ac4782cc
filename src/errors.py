"""Domain errors: what went wrong, in words a client can act on.

Domain functions raise these; ``src.api.errors`` turns them into RFC 9457 problem documents.
Each carries its HTTP status because the mapping is part of the API contract, and keeping it next
to the error stops the two drifting apart.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status: int = 400
    title: str = "Bad Request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        self.extra = extra


class NotAuthenticated(DomainError):
    status, title = 401, "Unauthorized"

    def __init__(self, detail: str = "Authentication required.") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class StepUpRequired(DomainError):
    """RFC 9470: the token is fine, but the authentication behind it is too old or too weak."""

    status, title = 401, "Unauthorized"

    def __init__(self, max_age: int, reason: str = "too_old") -> None:
        self.reason = reason
        super().__init__(
            "Sign in again (with your second factor, if you have one) to do this.",
            headers={
                "WWW-Authenticate": (
                    'Bearer error="insufficient_user_authentication", '
                    'error_description="A more recent authentication is required", '
                    f'max_age="{max_age}"'
                )
            },
        )


class PermissionDenied(DomainError):
    status, title = 403, "Forbidden"


class NotFound(DomainError):
    status, title = 404, "Not Found"


class Conflict(DomainError):
    status, title = 409, "Conflict"


class PreconditionFailed(DomainError):
    status, title = 412, "Precondition Failed"


class InvalidInput(DomainError):
    status, title = 422, "Validation failed"


class TooManyRequests(DomainError):
    status, title = 429, "Too Many Requests"

    def __init__(
        self, retry_after: float, detail: str = "Too many attempts; try again later."
    ) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(detail, headers={"Retry-After": str(seconds)}, retry_after=seconds)


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error from the token endpoint (``{"error": ...}``, not a problem)."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        # Members beside error and error_description (mfa_required carries its mfa_token).
        self.extra = extra or {}
