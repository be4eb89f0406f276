"""Engine-build service: HTTP API, persistent job queue, content-addressed artifact cache.

Run it with ``trtquant serve`` or ``python -m trtquant.service`` (see :func:`serve`); the
FastAPI app is :func:`create_app`. Needs the ``service`` extra (fastapi, uvicorn,
python-multipart). ``import trtquant.service`` itself imports none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_TOKEN_ENV", "BuildOptions", "ServiceConfig", "create_app", "main", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: keeps `python -m trtquant.service` free of runpy's double-import warning and
    # `import trtquant.service` free of fastapi/uvicorn.
    if name in ("serve", "main", "DEFAULT_TOKEN_ENV"):
        from trtquant.service import __main__ as entry

        return getattr(entry, name)
    if name in ("ServiceConfig", "create_app"):
        from trtquant.service import app

        return getattr(app, name)
    if name == "BuildOptions":
        from trtquant.service.jobs import BuildOptions

        return BuildOptions
    raise AttributeError(f"module 'trtquant.service' has no attribute {name!r}")
