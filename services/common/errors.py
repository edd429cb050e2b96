"""Exceptions -> gRPC status codes, in one place.

Bad input -> INVALID_ARGUMENT (the message names the field and the fix); overload ->
RESOURCE_EXHAUSTED (with a retry hint); model not ready -> UNAVAILABLE; a cancelled call ->
CANCELLED or DEADLINE_EXCEEDED; anything else -> INTERNAL, logged with its traceback. A bad request
never takes a server down.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import torch

from illusions.models import ModelLoadError
from illusions.sampling import InvalidInputError, SamplingCancelled
from illusions.views import ViewError
from services.common.codec import CodecError

logger = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
# The longest status message sent, in UTF-8 bytes. gRPC sends it percent-encoded in a trailer, and
# a trailer over its limit (8-16 KiB) replaces the whole status with a RESOURCE_EXHAUSTED of its
# own; a message that repeats a client's input can be that long.
MAX_STATUS_BYTES = 2048


def capped(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """``message``, or its start and end (where a message names the fix) joined by an ellipsis
    when it is longer than ``limit`` UTF-8 bytes."""
    data = message.encode()
    if len(data) <= limit:
        return message
    head = data[:limit * 2 // 3].decode(errors="ignore")
    tail = data[len(data) - limit // 3:].decode(errors="ignore")
    return f"{head} … {tail}"


class ServiceOverloaded(RuntimeError):
    """The bounded queue is full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(RuntimeError):
    """The model is still loading or warming up, or the server is draining."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    code, message = _status_for(exc)
    return code, capped(message)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, (InvalidInputError, ViewError, CodecError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ServiceOverloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                "out of accelerator memory for this request: retry later, or use fewer views")
    if isinstance(exc, (NotReady, ModelLoadError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, SamplingCancelled):
        return grpc.StatusCode.CANCELLED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.CANCELLED:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, capped(f"deadline exceeded: {exc}")
        logger.info("%s stopped: %s", method, message)
    elif code == grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", method)
    else:
        logger.warning("%s refused (%s): %s", method, code.name, message)
    if isinstance(exc, ServiceOverloaded):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(exc.retry_after_s * 1000))),))
    context.abort(code, message)


F = TypeVar("F", bound=Callable[..., Any])


def rpc_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) so that errors become statuses."""
    name = method.__qualname__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, never re-raised
                _abort(context, exc, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, name)

    return unary  # type: ignore[return-value]
