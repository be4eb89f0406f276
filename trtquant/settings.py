"""Every environment variable trtquant reads, in one typed settings object.

``get_settings()`` reads the environment once per process (the first call) and returns the same
:class:`TrtQuantSettings` afterwards; nothing else in trtquant reads ``os.environ``. Tests (and
programs that change the environment after start-up) call :func:`reload_settings`, or replace
single fields for a block with :func:`override_settings`.

==================================== ====================== =============================================
variable                             field                  meaning
==================================== ====================== =============================================
``TRTQUANT_CACHE_DIR``               ``cache_dir``          per-user cache (compiled kernels, models)
``XDG_CACHE_HOME``                   ``xdg_cache_home``     cache root when ``TRTQUANT_CACHE_DIR`` unset
``TRTQUANT_FUSED_KERNELS``           ``fused_kernels``      ``0``: unfused fake-quant reference everywhere
``TRTQUANT_NATIVE_HISTOGRAM``        ``native_histogram``   ``0``: CPU histograms with torch.histc
``TRTQUANT_REUSE_BUFFERS``           ``reuse_buffers``      ``0``: every large CPU fake-quant output is fresh
``CC``                               ``cc``                 C compiler for the native histogram kernel
``TRTQUANT_SERVICE_BACKEND``         ``service_backend``    build service backend: auto/tensorrt/onnxruntime
``TRTQUANT_SERVICE_TOKEN``           ``service_token``      build service bearer token (unset: no auth)
``TRTQUANT_SERVICE_TEST_BUILD_DELAY_S`` ``test_build_delay_s`` TEST HOOK: every service build sleeps this long
                                                            (also ``TRTQUANT_TEST_BUILD_DELAY_S``)
==================================== ====================== =============================================

The cached instance is this module's one deliberate global: settings are process-wide by nature,
and reading them once keeps the environment out of hot paths.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["TrtQuantSettings", "get_settings", "reload_settings", "override_settings", "env_value"]

_FALSE = {"0", "false", "no", "off"}


class TrtQuantSettings(BaseSettings):
    """trtquant's environment, typed. Field ``x`` is ``$TRTQUANT_X`` unless its alias says otherwise."""

    model_config = SettingsConfigDict(env_prefix="TRTQUANT_", extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True, frozen=True)

    cache_dir: Optional[Path] = None
    xdg_cache_home: Optional[Path] = Field(default=None,
                                           validation_alias=AliasChoices("XDG_CACHE_HOME", "xdg_cache_home"))
    fused_kernels: bool = True
    native_histogram: bool = True
    reuse_buffers: bool = True
    cc: Optional[str] = Field(default=None, validation_alias=AliasChoices("CC", "cc"))
    service_backend: Optional[str] = None
    service_token: Optional[SecretStr] = None
    test_build_delay_s: float = Field(
        default=0.0, validation_alias=AliasChoices("TRTQUANT_SERVICE_TEST_BUILD_DELAY_S", "TRTQUANT_TEST_BUILD_DELAY_S",
                                           "test_build_delay_s"),
        description="TEST HOOK: the build service sleeps this long before publishing each build")

    @field_validator("fused_kernels", "native_histogram", "reuse_buffers", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        # As before: only an explicit off value turns a switch off; anything else leaves it on.
        if isinstance(v, str):
            return v.strip().lower() not in _FALSE
        return v

    @field_validator("service_backend", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() or None if isinstance(v, str) else v

    @property
    def cache_root(self) -> Path:
        """``cache_dir``, else ``$XDG_CACHE_HOME/trtquant``, else ``~/.cache/trtquant``."""
        if self.cache_dir is not None:
            return self.cache_dir
        return (self.xdg_cache_home or Path.home() / ".cache") / "trtquant"


_lock = threading.Lock()
_current: Optional[TrtQuantSettings] = None


def get_settings() -> TrtQuantSettings:
    """The process's settings, read from the environment on the first call."""
    s = _current
    if s is None:
        s = reload_settings()
    return s


def reload_settings() -> TrtQuantSettings:
    """Read the environment again (after it changed, e.g. ``monkeypatch.setenv`` in a test)."""
    global _current
    with _lock:
        _current = TrtQuantSettings()
        return _current


@contextlib.contextmanager
def override_settings(**fields: Any) -> Iterator[TrtQuantSettings]:
    """Within the block, ``get_settings()`` returns the current settings with ``fields`` replaced."""
    global _current
    before = get_settings()
    _current = before.model_copy(update=fields)
    try:
        yield _current
    finally:
        _current = before


def env_value(name: str) -> Optional[str]:
    """A variable whose name is chosen at run time (the service's ``--token-env``); None when unset."""
    return os.environ.get(name)
