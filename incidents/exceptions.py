"""Domain errors. Raised by services; mapped once per surface (admin message, API 4xx,
command exit code)."""


class DomainError(Exception):
    """A request the domain refuses. The message is shown to the person who asked."""


class InvalidTransition(DomainError):
    def __init__(self, reference: str, current: str, requested: str, reason: str = "") -> None:
        self.reference, self.current, self.requested = reference, current, requested
        message = f"{reference} cannot go from {current} to {requested}"
        super().__init__(f"{message}: {reason}" if reason else f"{message}.")


class InvalidInput(DomainError):
    """A field value the domain refuses; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ConcurrentChange(DomainError):
    """Someone else changed the incident between our read and our write; try again."""


class RetryLater(Exception):
    """Not a domain error: a temporary failure of an outside system (a mail server that
    defers, a webhook that answers 5xx). The Celery task that met it tries again with
    backoff."""
