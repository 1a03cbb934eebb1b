"""The process-wide settings and producer, for code outside the runtime (views, benchmarks).

``scalepub.django.runtime`` owns them; these functions only reach them.
"""

from __future__ import annotations

from scalepub.django.runtime import runtime
from scalepub.producer import StreamProducer
from scalepub.settings import Settings


def get_settings() -> Settings:
    """Settings from the ``SCALEPUB`` dict (defaults where it is silent)."""
    return runtime.settings()


def get_producer() -> StreamProducer:
    """The shared StreamProducer (thread-safe; a new one after a fork)."""
    return runtime.producer()


def reset() -> None:
    """Stop the relay threads (after a drain) and forget settings and producer."""
    runtime.reset()
