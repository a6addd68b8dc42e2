"""The ``/model`` routes: versions, promotion, rollback, pins, upload and download through the model store.

Installed in front of MONAI Label's ``/model`` routes (which overwrite or delete the one model
file). Every one of them is on the admin surface (``lib.serving.security``).

* ``GET /model/{model}/versions``                  the versions (id, created, Dice, state, reason) and the serving one
* ``POST /model/{model}/promote/{version}``        serve that version from the next request on
* ``POST /model/{model}/rollback``                 serve the version that served before
* ``PUT|DELETE /model/{model}/pin/{version}``      keep a version whatever ``keep_versions`` says / release it
* ``PUT /model/{model}?serve=true``                upload a model file (form field ``file``): its meta is validated
  (schema, model name, labels, channels) and its weights must load into the network its spec
  describes; it is added as a new version (``source: uploaded``), served unless ``serve=false``
* ``GET /model/{model}``                           the serving version's file (``X-Model-Version`` header)
* ``DELETE /model/{model}``                        409: versions are removed by ``keep_versions``, never by hand
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..checkpoints import CheckpointMeta, MetaError, incompatibility, read_checkpoint
from ..conf import parse_bool
from ..modelstore import StoreError, UnknownVersion
from .routes import RequestFiles, http_error

logger = logging.getLogger(__name__)


def store_error(e: BaseException) -> HTTPException:
    """404 for an unknown version, 422 for a malformed id or model file, 409 for what the store's state forbids."""
    if isinstance(e, UnknownVersion):
        return HTTPException(status_code=404, detail=str(e))
    if isinstance(e, MetaError) or (isinstance(e, StoreError) and "invalid version id" in str(e)):
        return HTTPException(status_code=422, detail=str(e))
    if isinstance(e, StoreError):
        return HTTPException(status_code=409, detail=str(e))
    return http_error(e)


class ModelRoutes:
    """Handlers of the ``/model`` routes (see module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def _task(self, model: str) -> Any:
        try:
            return self.app.infer_task(model)
        except KeyError as e:
            raise HTTPException(status_code=404, detail=str(e.args[0])) from e

    def versions(self, model: str) -> dict[str, Any]:
        task = self._task(model)
        serving = task.store.serving()
        return {"model": model, "serving": serving.id if serving else None, "versions": task.store.describe()}

    def _switched(self, model: str) -> dict[str, Any]:
        task = self._task(model)
        task.clear_cache()
        out = self.versions(model)
        out["ready"] = task.is_valid()
        if not out["ready"]:
            out["not_ready_reason"] = task.not_ready_reason()
        return out

    async def promote(self, model: str, version: str, user: str = "") -> dict[str, Any]:
        store = self._task(model).store
        try:
            await run_in_threadpool(store.promote, version, f"promoted by {user or 'an admin'} (REST)")
        except Exception as e:  # noqa: BLE001
            raise store_error(e) from e
        return self._switched(model)

    async def rollback(self, model: str) -> dict[str, Any]:
        store = self._task(model).store
        try:
            await run_in_threadpool(store.rollback)
        except Exception as e:  # noqa: BLE001
            raise store_error(e) from e
        return self._switched(model)

    async def pin(self, model: str, version: str, pinned: bool) -> dict[str, Any]:
        store = self._task(model).store
        try:
            await run_in_threadpool(store.pin, version, pinned)
        except Exception as e:  # noqa: BLE001
            raise store_error(e) from e
        return self.versions(model)

    def check_upload(self, task: Any, path: str) -> CheckpointMeta:
        """The upload's meta, if the file is a unet_seg model this model can serve (else MetaError naming why)."""
        try:
            state, raw = read_checkpoint(path)
        except MetaError:
            raise
        except Exception as e:  # noqa: BLE001 - torch's unpickler refuses anything but tensors and plain containers
            raise MetaError(f"file: not a model file unet_seg can read safely ({type(e).__name__})") from e
        meta = CheckpointMeta.from_dict(raw, strict=True)
        if meta.model != task.model_name:
            raise MetaError(f"file: a '{meta.model}' model cannot be uploaded as '{task.model_name}'")
        reason = incompatibility(meta, task.expected_meta())
        if reason:
            raise MetaError(f"file: {reason}")
        try:
            task.build_network(meta).load_state_dict(state, strict=True)
        except Exception as e:  # noqa: BLE001
            raise MetaError(
                f"file: its weights do not fit the network its spec describes ({str(e).splitlines()[0][:300]})"
            ) from e
        return meta

    def _add_upload(self, task: Any, path: str, serve: bool, user: str) -> dict[str, Any]:
        self.check_upload(task, path)
        rec = task.store.import_file(path, source="uploaded", serve=serve)
        logger.info(
            f"{task.model_name}: {rec.id} uploaded by {user or 'an admin'} ({'serving' if serve else 'candidate'})"
        )
        return {"version": rec.id, "served": serve}

    async def upload(self, request: Request, model: str, serve: str = "true", user: str = "") -> dict[str, Any]:
        task = self._task(model)
        files = RequestFiles()
        try:
            serve_flag = parse_bool(serve, "serve")
            await files.read(request, ("file",), suffix=lambda name: ".pt")  # any name: the content is checked
            if "file" not in files.files:
                raise HTTPException(status_code=422, detail="file: upload the model as multipart form field 'file'")
            out = await run_in_threadpool(self._add_upload, task, files.files["file"][0], serve_flag, user)
        except Exception as e:  # noqa: BLE001
            raise store_error(e) from e
        finally:
            files.cleanup()
        return {**out, **self._switched(model)}

    def download(self, model: str) -> FileResponse:
        store = self._task(model).store
        serving = store.serving()
        if serving is None:
            raise HTTPException(status_code=404, detail=f"model '{model}' has no serving version")
        return FileResponse(
            store.path(serving.id),
            media_type="application/octet-stream",
            filename=f"{model}-{serving.id}.pt",
            headers={"X-Model-Version": serving.id},
        )

    @staticmethod
    def refuse_delete(model: str) -> None:
        raise HTTPException(
            status_code=409,
            detail=f"model versions are not deleted by hand: roll back (POST /model/{model}/rollback) "
            f"or promote another version; old versions are pruned by keep_versions",
        )

    def table(self, admin: Any) -> list[tuple[str, list[str], Callable[..., Any]]]:
        """(path, methods, endpoint) rows; ``admin`` is the RBAC dependency of the admin role."""
        routes = self

        def name(u: Any) -> str:
            return str(getattr(u, "username", "") or "")

        async def versions(model: str, u: Any = admin) -> dict:
            return routes.versions(model)

        async def promote(model: str, version: str, u: Any = admin) -> dict:
            return await routes.promote(model, version, name(u))

        async def rollback(model: str, u: Any = admin) -> dict:
            return await routes.rollback(model)

        async def pin(model: str, version: str, u: Any = admin) -> dict:
            return await routes.pin(model, version, True)

        async def unpin(model: str, version: str, u: Any = admin) -> dict:
            return await routes.pin(model, version, False)

        async def upload(request: Request, model: str, serve: str = "true", u: Any = admin) -> dict:
            return await routes.upload(request, model, serve, name(u))

        async def download(model: str, u: Any = admin) -> FileResponse:
            return routes.download(model)

        async def delete(model: str, u: Any = admin) -> None:
            routes.refuse_delete(model)

        return [
            ("/model/{model}/versions", ["GET"], versions),
            ("/model/{model}/promote/{version}", ["POST"], promote),
            ("/model/{model}/rollback", ["POST"], rollback),
            ("/model/{model}/pin/{version}", ["PUT"], pin),
            ("/model/{model}/pin/{version}", ["DELETE"], unpin),
            ("/model/{model}", ["PUT"], upload),
            ("/model/{model}", ["GET"], download),
            ("/model/{model}", ["DELETE"], delete),
        ]
