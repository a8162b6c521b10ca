"""What the app changes in MONAI Label's own server, at start-up, without forking its code.

1. ``POST /infer/{model}``: MONAI Label 0.8.5 declares the handler ``async def`` and runs the
   whole inference synchronously inside it, so one long inference freezes the event loop and
   with it every other request (``/info/``, ``/datastore/``, other clients). Overriding the app's
   ``infer()`` cannot help (it is still called from that coroutine), and middleware cannot be
   added once the server has started. So the route is shadowed by one with the SAME signature
   (hence the same form fields, query params and auth dependency) whose endpoint is a plain
   ``def``: FastAPI runs such endpoints in its worker thread pool. It calls MONAI Label's own
   ``run_inference``; the app's ``infer()`` then bounds how many run at once
   (:mod:`lib.server.concurrency`). Before that, the request is checked: an image id must name an
   image of the datastore (MONAI Label would take an existing server path as the image, or
   answer 500 for an unknown id), and params may not override the server-set keys
   ``image``, ``label``, ``file`` and ``session`` (which would again name server paths).
   ``PUT /datastore/label`` is served the same way: the app's datastore decodes and checks a
   submitted label before storing it (:mod:`lib.server.datastore`), which takes a while for a big one.
   ``POST /batch/infer/{model}`` is checked before its task starts (server keys, and a support
   named in its params must be able to serve), so that even an asynchronous batch answers 4xx.
2. Request bodies are bounded (``--conf max_upload_mb``): MONAI Label spools any upload to disk
   whatever its size. The limit wraps the server's ASGI stack: a declared ``Content-Length``
   above it is refused at once with 413, and a chunked body is cut off when it passes it.
"""

from __future__ import annotations

import inspect
import json
import logging

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import batch_infer as batch_infer_endpoint
from monailabel.endpoints import datastore as datastore_endpoint
from monailabel.endpoints import infer as infer_endpoint
from monailabel.interfaces.utils.app import app_instance

from lib.infers.guard import http_errors
from lib.infers.support import named_supports

logger = logging.getLogger(__name__)

INFER_PATH = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"
LABEL_PATH = f"{settings.MONAI_LABEL_API_STR}/datastore/label"
BATCH_PATH = f"{settings.MONAI_LABEL_API_STR}/batch/infer/{{model}}"
SERVER_KEYS = ("image", "label", "file", "session")


def check_server_keys(params: dict) -> None:
    """Params may not set the keys the server fills with paths (the image, an uploaded label)."""
    overriding = sorted(set(params) & set(SERVER_KEYS))
    if overriding:
        raise HTTPException(
            status_code=400,
            detail=f"params {overriding} are set by the server: name the image in the query (?image=ID) and "
            "upload files as form files",
        )


def check_infer_request(image: str, session_id: str, params: str, uploaded: bool) -> None:
    """Refuse what MONAI Label would turn into a server path or a 500, with a 4xx naming it."""
    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError as error:
        raise HTTPException(status_code=400, detail=f"form field 'params' is not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=400, detail="form field 'params' must be a JSON object")
    check_server_keys(parsed)
    if uploaded or session_id:
        return
    if not image:
        raise HTTPException(status_code=400, detail="no image: name one with ?image=ID or upload it as file 'file'")
    if image not in app_instance().datastore().list_images():
        raise HTTPException(status_code=404, detail=f"image '{image}' is not in the datastore")


def infer_in_threadpool(*, user=None, **kwargs):
    """``POST /infer/{model}`` as MONAI Label serves it, but in a worker thread (see module doc)."""
    check_infer_request(kwargs["image"], kwargs["session_id"], kwargs["params"], kwargs["file"] is not None)
    return infer_endpoint.run_inference(**kwargs)


infer_in_threadpool.__signature__ = inspect.signature(infer_endpoint.api_run_inference)


def checked_batch_infer(*, user=None, **kwargs):
    """``POST /batch/infer/{model}`` as MONAI Label serves it, once its params are checked."""
    params = kwargs["params"] or {}
    check_server_keys(params)
    if params.get("support"):
        app = app_instance()
        with http_errors():
            for support in named_supports(app.datastore(), params["support"]):
                support.load(max_voxels=app.settings.max_voxels)
    return batch_infer_endpoint.run(**kwargs)


checked_batch_infer.__signature__ = inspect.signature(batch_infer_endpoint.api_run)


def save_label_in_threadpool(*, user, **kwargs):
    """``PUT /datastore/label`` as MONAI Label serves it, but in a worker thread."""
    return datastore_endpoint.save_label(**kwargs, user=user.username)


save_label_in_threadpool.__signature__ = inspect.signature(datastore_endpoint.api_save_label)

THREADED = [
    ("POST", INFER_PATH, infer_in_threadpool),
    ("PUT", LABEL_PATH, save_label_in_threadpool),
    ("POST", BATCH_PATH, checked_batch_infer),
]


def serve_in_threadpool(app: FastAPI) -> None:
    """Put the threaded routes FIRST in the app's routes: they answer before MONAI Label's own
    (which stay registered and documented, same signatures)."""
    routes = app.router.routes
    ours = {endpoint for _, _, endpoint in THREADED}
    routes[:] = [r for r in routes if getattr(r, "endpoint", None) not in ours]
    for method, path, endpoint in reversed(THREADED):
        route = APIRoute(
            path,
            endpoint,
            methods=[method],
            name=endpoint.__name__,
            include_in_schema=False,
            dependency_overrides_provider=app,
        )
        routes.insert(0, route)


class UploadLimit:
    """ASGI wrapper refusing request bodies above ``max_bytes`` with 413."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"upload too large: the limit is {self.max_bytes / 2**20:g} MB (--conf max_upload_mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message()}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())  # answered by FastAPI
            return message

        await self.app(scope, limited_receive, send)


def limit_uploads(app: FastAPI, max_bytes: int) -> None:
    stack = app.middleware_stack or app.build_middleware_stack()
    if isinstance(stack, UploadLimit):
        stack.max_bytes = max_bytes
    else:
        app.middleware_stack = UploadLimit(stack, max_bytes)


def install(app: FastAPI, max_upload_mb: float) -> None:
    serve_in_threadpool(app)
    limit_uploads(app, int(max_upload_mb * 2**20))
    logger.info(f"/infer and label uploads served in a thread pool; bodies limited to {max_upload_mb:g} MB")
