"""The process-wide producer, built lazily from ``settings.SCALEPUB``."""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings as django_settings

from scalepub.producer import StreamProducer
from scalepub.settings import DJANGO_SETTING, Settings

_lock = threading.Lock()
_settings: Settings | None = None
_producer: StreamProducer | None = None


def get_settings() -> Settings:
    """Settings from the ``SCALEPUB`` dict (defaults where it is silent)."""
    global _settings
    if _settings is None:
        _settings = Settings.from_mapping(getattr(django_settings, DJANGO_SETTING, {}))
    return _settings


def get_producer() -> StreamProducer:
    """The shared StreamProducer (thread-safe; redis-py's pool handles forks)."""
    global _producer
    with _lock:
        if _producer is None:
            _producer = StreamProducer(get_settings())
        return _producer


def reset() -> None:
    """Forget settings, producer and relay threads (after the SCALEPUB setting changed)."""
    global _settings, _producer
    from scalepub.django.relay import stop_threads

    stop_threads()
    with _lock:
        if _producer is not None:
            _producer.close()
        _settings, _producer = None, None


def on_setting_changed(setting: str, **kwargs: Any) -> None:
    """``setting_changed`` receiver: rebuild on the next use."""
    if setting == DJANGO_SETTING:
        reset()
