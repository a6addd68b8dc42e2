"""The request-facing routes that replace MONAI Label's for inference, uploads, training and next-sample.

Installed in front of MONAI Label's own routes (same paths, same replies, same auth dependency)
when the app starts in server mode. Each route follows one direction:
route -> admission (params, ids, file headers, limits) -> executor or worker thread -> task.

* ``POST /infer/{model}``   params checked, image header probed (voxel limit) on the loop, then
  the inference (which reads and checks every voxel) runs on the bounded executor; 503 +
  ``Retry-After`` when its queue is full; a queued request whose client left is dropped.
* ``PUT /datastore/image``, ``PUT /datastore/label``  streamed to a per-request temp folder,
  checked and stored in a worker thread; 409 for an existing image id unless ``overwrite``.
* ``POST /train/{model}``, ``/train/``, ``/activelearning/{strategy}``, ``/scoring/{method}``,
  ``/batch/infer/{model}``  body checked before any task exists; the work starts off the loop.
Every request's temp folder is removed when its reply has been sent, whatever happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import requests
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.datastore import ResultType
from monailabel.endpoints.datastore import datastore as datastore_listing
from monailabel.endpoints.info import app_info
from monailabel.endpoints.user.auth import RBAC, User
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..conf import ConfError, parse_bool
from ..datastore import ValidatingDatastore, check_id, check_image_upload, check_label_upload
from ..dicomweb import pacs_fault
from ..validation import InputError, TooLarge, check_affine, check_dtype, file_suffix, probe_file
from .executor import BoundedExecutor, QueueFull
from .limits import Limits
from .params import INFER_FIELDS, TRAIN_FIELDS, check_info_size, check_params, parse_params
from .preannotate import IMAGE_SETS, PreAnnotation

logger = logging.getLogger(__name__)

OUTPUTS = ("image", "json", "all", "dicom_seg")


def http_error(e: BaseException) -> HTTPException:
    """The 4xx for a client's mistake (TooLarge 413, bad input 422, busy 503); others pass through."""
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, TooLarge):
        return HTTPException(status_code=413, detail=str(e))
    if isinstance(e, (InputError, ConfError)):
        return HTTPException(status_code=422, detail=str(e))
    if isinstance(e, QueueFull):
        return HTTPException(status_code=503, detail=str(e), headers={"Retry-After": str(e.retry_after)})
    fault = pacs_fault(e)
    if fault is not None:
        return HTTPException(status_code=fault[0], detail=fault[1], headers={"Retry-After": "30"})
    raise e


async def pacs_fault_reply(request: Request, exc: Exception) -> JSONResponse:
    """Any route (MONAI Label's own included) that fails talking to the PACS: 502/503/504 with a message."""
    status, detail = pacs_fault(exc) or (502, "an upstream service failed; nothing was changed")
    logger.warning(f"{request.method} {request.url.path}: {detail} ({type(exc).__name__})")
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": "30"})


#: (path, methods, endpoint) rows of routes to install
RouteTable = list[tuple[str, list[str], Callable[..., Any]]]


class RequestFiles:
    """A request's multipart form, with every uploaded file copied into its own temp folder."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="unet_seg-req-")
        self.fields: dict[str, str] = {}
        self.files: dict[str, tuple[str, str]] = {}  # field -> (path on disk, client's file name)

    async def read(
        self, request: Request, file_fields: tuple[str, ...], suffix: Callable[[str], str] = file_suffix
    ) -> RequestFiles:
        """Copy the form's files (only ``file_fields``; ``suffix`` names each file's format or refuses it)
        and fields."""
        if not request.headers.get("content-type", "").startswith(
            ("multipart/form-data", "application/x-www-form-urlencoded")
        ):
            return self
        form = await request.form(max_files=4, max_fields=16, max_part_size=1024 * 1024)
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in file_fields:
                        raise HTTPException(
                            status_code=422, detail=f"unexpected file field {key!r}; expected: {', '.join(file_fields)}"
                        )
                    name = os.path.basename(value.filename or "upload.nii.gz")
                    path = os.path.join(self.folder, f"{key}{suffix(name)}")
                    with open(path, "wb") as out:
                        await run_in_threadpool(shutil.copyfileobj, value.file, out, 1024 * 1024)
                    self.files[key] = (path, name)
                else:
                    self.fields[key] = value
        finally:
            await form.close()
        return self

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_archive(path: str, max_bytes: int, max_members: int = 10_000) -> None:
    """Refuse archives with links, devices, absolute or ``..`` names, too many members or too many bytes."""
    import tarfile
    import zipfile

    def check_name(name: str) -> None:
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts or any(ord(c) < 32 for c in name):
            raise InputError(f"archive member {name[:80]!r} points outside its folder")

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:  # (name, regular file or folder, size); a zip symlink has mode 0o120000
            entries = [(i.filename, (i.external_attr >> 16) & 0o170000 != 0o120000, i.file_size) for i in z.infolist()]
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            entries = [(m.name, m.isfile() or m.isdir(), m.size) for m in t.getmembers()]
    else:
        raise InputError("uncompress: the file is not a zip or tar archive")
    if len(entries) > max_members:
        raise InputError(f"archive has {len(entries)} members (limit {max_members})")
    for name, regular, _ in entries:
        check_name(name)
        if not regular:
            raise InputError(f"archive member {name[:80]!r} is not a regular file (link or device)")
    total = sum(size for _, _, size in entries)
    if total > max_bytes:
        raise TooLarge(f"archive expands to {total:,} bytes, over the limit of {max_bytes:,} (conf max_upload_mb)")


def remove_paths(*paths: str | None) -> None:
    """Remove files or folders (result files, request temp folders) after the reply was sent."""
    for path in paths:
        if not path:
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


class Routes:
    """Owns the executor and the route functions; ``install`` puts them in front of MONAI Label's."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app = app  # the UNetSegApp
        self.limits = limits
        self.executor = BoundedExecutor("infer", limits.infer_workers, limits.infer_queue)
        self.preannotation = PreAnnotation(app, self.executor)
        self._digests: dict[tuple[str, int, int], str] = {}
        self._digest_lock = threading.Lock()

    # ---- inference ------------------------------------------------------------------------
    def _resolve_image(self, files: RequestFiles, image: str, session_id: str) -> str:
        """Path of the image to segment: an uploaded file, a datastore id or a session; header checked."""
        if "file" in files.files:
            path, name = files.files["file"]
        elif image:
            check_id(image)
            datastore = self.app.datastore()
            if image not in datastore.list_images():
                raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore")
            path = datastore.get_image_uri(image)
            name = path
        elif session_id:
            check_id(session_id, "session id")
            session = self.app.sessions().get_session(session_id) if self.app.sessions() else None
            if not session:
                raise HTTPException(status_code=404, detail=f"session {session_id!r} not found (expired?)")
            path, name = session.image, session.image
            if os.path.isdir(path):  # an extracted archive: one image file inside is that image; else a DICOM series
                found = [
                    f
                    for f in sorted(os.listdir(path))
                    if os.path.isfile(os.path.join(path, f)) and not f.lower().endswith(".dcm")
                ]
                if len(found) == 1:
                    path = name = os.path.join(path, found[0])
        else:
            raise HTTPException(
                status_code=422,
                detail="image: give a datastore image id (?image=<id>) or upload the image as form field 'file'",
            )
        if os.path.isdir(path):
            return path  # a DICOM series folder: the reader checks it
        header = probe_file(path, name, self.limits.max_voxels)
        if header.dtype is not None:
            check_dtype(np.empty(0, header.dtype), "image")
        check_affine(header.affine, "image")
        return path

    async def infer(
        self, request: Request, model: str, image: str = "", session_id: str = "", output: str | None = None
    ) -> Response:
        files = RequestFiles()
        keep_folder = False
        try:
            if model not in self.app._infers:
                raise HTTPException(
                    status_code=404, detail=f"unknown model {model!r}; available models: {', '.join(self.app._infers)}"
                )
            if output is not None and output not in OUTPUTS:
                raise HTTPException(
                    status_code=422, detail=f"output: expected one of {', '.join(OUTPUTS)}; got {output[:40]!r}"
                )
            seg_of = getattr(self.app.datastore(), "seg_of", None) if output == "dicom_seg" else None
            if output == "dicom_seg" and (seg_of is None or not image):
                where = (
                    "needs a DICOMweb datastore; this server stores files"
                    if seg_of is None
                    else "needs a series of the PACS (?image=<SeriesInstanceUID>), not an uploaded file or session"
                )
                raise HTTPException(status_code=422, detail=f"output=dicom_seg {where} (use output=image, json or all)")
            await files.read(request, ("file", "label"))
            if "label" in files.files:
                raise HTTPException(
                    status_code=422, detail=f"label: model {model!r} takes no input label (send only 'file' or ?image=)"
                )
            if seg_of is not None and "file" in files.files:
                raise HTTPException(
                    status_code=422, detail="output=dicom_seg: segment a series of the PACS (?image=), not an upload"
                )
            params = check_params(parse_params(files.fields.get("params"), "params"), INFER_FIELDS, "params")
            path = await run_in_threadpool(self._resolve_image, files, image, session_id)  # reads the gzip stream
            req = {**params, "model": model, "image": path}
            if seg_of is not None:
                req["result_extension"] = ".nii.gz"  # the SEG is made from the label in the series' grid
            result = await self.executor.run(self.app.infer, req, client_gone=request.is_disconnected)
            result_file = result.get("file")
            keep_folder = True
            cleanup = BackgroundTask(remove_paths, result_file, files.folder)
            if seg_of is not None:
                return await run_in_threadpool(self._seg_reply, seg_of, image, result_file, cleanup)
            return self._reply(result, output or "all", cleanup)
        except asyncio.CancelledError:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - mapped to the client's 4xx or re-raised
            err = http_error(e)
            if "file" in files.files and isinstance(err.detail, str):  # name the client's file, not our temp path
                path, name = files.files["file"]
                err.detail = err.detail.replace(path, f"(uploaded file {name[-60:]!r})")
            raise err from e
        finally:
            if not keep_folder:
                files.cleanup()

    @staticmethod
    def _seg_reply(seg_of: Any, image: str, result_file: str, cleanup: BackgroundTask) -> Response:
        """The prediction as a DICOM SEG (AUTOMATIC segments, one per model label) over series ``image``."""
        seg = seg_of(image, result_file, manual=False)
        buffer = io.BytesIO()
        seg.save_as(buffer, write_like_original=False)
        return Response(
            content=buffer.getvalue(),
            media_type="application/dicom",
            headers={"Content-Disposition": f'attachment; filename="{seg.SeriesInstanceUID}.dcm"'},
            background=cleanup,
        )

    @staticmethod
    def _reply(result: dict[str, Any], output: str, cleanup: BackgroundTask) -> Response:
        res_file = result.get("file")
        res_json = result.get("params") or {}
        if output == "json" or not res_file or not os.path.exists(res_file):
            return JSONResponse(res_json, background=cleanup)
        if output == "image":
            media = "application/gzip" if res_file.endswith(".gz") else "application/octet-stream"
            return FileResponse(res_file, media_type=media, filename=os.path.basename(res_file), background=cleanup)
        from requests_toolbelt import MultipartEncoder

        with open(res_file, "rb") as f:
            encoder = MultipartEncoder(
                fields={
                    "params": (None, json.dumps(res_json), "application/json"),
                    "image": (os.path.basename(res_file), f.read(), "application/octet-stream"),
                }
            )
            return Response(content=encoder.to_string(), media_type=encoder.content_type, background=cleanup)

    # ---- datastore downloads ------------------------------------------------------------
    def _digest(self, path: str) -> tuple[int, str]:
        """(size, sha256) of a stored file, remembered per (path, size, mtime) so a study is hashed once."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        with self._digest_lock:
            if key in self._digests:
                return st.st_size, self._digests[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with self._digest_lock:
            if len(self._digests) > 4096:
                self._digests.clear()
            self._digests[key] = h.hexdigest()
        return st.st_size, self._digests[key]

    def _file_reply(self, path: str, stem: str, check_only: bool) -> Response:
        size, digest = self._digest(path)
        name = f"{stem}{file_suffix(path)}"
        if check_only:
            return JSONResponse({"image": stem, "name": name, "size": size, "sha256": digest})
        return FileResponse(
            path, media_type="application/octet-stream", filename=name, headers={"X-Image-SHA256": digest}
        )

    async def _download(self, image: str, tag: str | None, check_only: bool) -> Response:
        """Image ``image`` (``tag`` None) or its label tagged ``tag``, as stored, with its SHA-256."""

        def find() -> str:
            datastore = self.app.datastore()
            if image not in datastore.list_images():
                raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore")
            if tag is None:
                path, missing = datastore.get_image_uri(image), f"image {image!r} has no single file to send"
            else:
                path = datastore.get_label_uri(image, tag) if datastore.get_label_info(image, tag) else ""
                missing = f"image {image!r} has no label tagged {tag!r}"
            if not path or not os.path.isfile(path):
                raise HTTPException(status_code=404, detail=missing)
            return path

        try:
            path = await run_in_threadpool(find)
            return await run_in_threadpool(self._file_reply, path, image, check_only)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def download_image(self, image: str, check_only: bool = False) -> Response:
        """``GET /datastore/image``: the stored file with its SHA-256 (``check_only``: just size and SHA-256)."""
        return await self._download(check_id(image), None, check_only)

    async def download_label(self, label: str, tag: str, check_only: bool = False) -> Response:
        """``GET /datastore/label``: image ``label``'s label tagged ``tag``, with its SHA-256."""
        return await self._download(check_id(label), check_id(tag, "label tag"), check_only)

    # ---- datastore uploads ----------------------------------------------------------------
    async def add_image(self, request: Request, image: str | None = None, user: User | None = None) -> dict:
        files = RequestFiles()
        try:
            await files.read(request, ("file",))
            if "file" not in files.files:
                raise HTTPException(status_code=422, detail="file: upload the image as multipart form field 'file'")
            path, name = files.files["file"]
            image_id = image or name[: -len(file_suffix(name))]
            check_id(image_id)
            params = parse_params(files.fields.get("params"), "params")
            overwrite = parse_bool(params.pop("overwrite", False), "overwrite")
            if overwrite:
                self._require_reviewer(request, f"replacing image {image_id!r}")
            check_info_size(params)
            if user is not None and getattr(user, "username", None):
                params["user"] = user.username
            return await run_in_threadpool(self._store_image, image_id, path, name, params, overwrite)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e
        finally:
            files.cleanup()

    def _store_image(
        self, image_id: str, path: str, name: str, params: dict[str, Any], overwrite: bool
    ) -> dict[str, Any]:
        datastore = self.app.datastore()
        if isinstance(datastore, ValidatingDatastore):
            return datastore.add_checked_image(image_id, path, name, params, overwrite)
        check_image_upload(self.app.upload_rules(), path, name)
        if image_id in datastore.list_images() and not overwrite:
            raise HTTPException(
                status_code=409,
                detail=f'image {image_id!r} already exists; send params {{"overwrite": true}} to replace it',
            )
        return {"image": datastore.add_image(image_id, path, params)}

    def _require_reviewer(self, request: Request, what: str) -> None:
        """With auth on, replacing a person's final label or an image needs the reviewer role."""
        security = getattr(self.app, "security", None)
        if security is None or not security.auth_enabled:
            return
        user = (request.scope.get("state") or {}).get("user") or {}
        if security.level(user.get("roles", [])) < 2:
            raise HTTPException(
                status_code=403,
                detail=f"{what} needs the role {security.role_names[2]!r} (or higher); "
                f"user {user.get('username', '')!r} has {user.get('roles') or 'no roles'}",
            )

    async def save_label(self, request: Request, image: str, tag: str = "final", user: User | None = None) -> dict:
        files = RequestFiles()
        try:
            check_id(image)
            check_id(tag or "final", "label tag")
            await files.read(request, ("label",))
            if "label" not in files.files:
                raise HTTPException(status_code=422, detail="label: upload the label as multipart form field 'label'")
            path, name = files.files["label"]
            params = parse_params(files.fields.get("params"), "params")
            check_info_size(params)
            if (
                (tag or "final") == "final"
                and image in self.app.datastore().list_images()
                and self.app.datastore().get_label_by_image_id(image, "final")
            ):
                self._require_reviewer(request, f"replacing the final label of {image!r}")

            def store() -> dict:
                datastore = self.app.datastore()
                if isinstance(datastore, ValidatingDatastore):
                    label_id = datastore.save_checked_label(image, path, name, tag or "final", params)
                else:  # e.g. DICOMweb: what can be checked without a local image file
                    allow_empty = (
                        parse_bool(params.pop("allow_empty", False), "allow_empty") or (tag or "final") != "final"
                    )
                    check_label_upload(self.app.upload_rules(), path, name, allow_empty)
                    label_id = datastore.save_label(image, path, tag or "final", params)
                res = self.app.on_save_label(image, label_id) or {}
                return {**res, "image": image, "label": label_id}

            return await run_in_threadpool(store)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e
        finally:
            files.cleanup()

    # ---- training and next sample ---------------------------------------------------------
    async def _json_body(self, request: Request, what: str) -> dict[str, Any]:
        body = await request.body()
        return parse_params(body, what)

    async def train(self, request: Request, model: str, run_sync: bool = False, enqueue: bool = False) -> Any:
        try:
            if model not in self.app._trainers:
                raise HTTPException(
                    status_code=404,
                    detail=f"unknown model {model!r}; trainable models: {', '.join(self.app._trainers)}",
                )
            params = check_params(await self._json_body(request, "training request"), TRAIN_FIELDS, "training request")
            from monailabel.endpoints.train import run_model

            return await run_in_threadpool(run_model, model, params, run_sync, enqueue)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def train_all(self, request: Request, run_sync: bool = False) -> Any:
        """``POST /train/`` (every model): the body maps model names to their training requests."""
        try:
            body = await self._json_body(request, "training request")
            for model, params in body.items():
                if model not in self.app._trainers:
                    raise HTTPException(
                        status_code=404,
                        detail=f"unknown model {str(model)[:60]!r}; trainable models: {', '.join(self.app._trainers)}",
                    )
                check_params(
                    parse_params(params, f"training request for {model}"), TRAIN_FIELDS, f"training request for {model}"
                )
            from monailabel.endpoints.train import run

            return await run_in_threadpool(run, body, run_sync)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def scoring(self, request: Request, method: str, run_sync: bool = False) -> Any:
        """``POST /scoring/{method}``: body checked, the task started (or run, ``run_sync``) off the loop."""
        try:
            if method not in self.app._scoring_methods:
                raise HTTPException(
                    status_code=404,
                    detail=f"unknown scoring method {method[:60]!r}; available: {', '.join(self.app._scoring_methods)}",
                )
            params = await self._json_body(request, "scoring request")
            from monailabel.endpoints.scoring import run_method

            return await run_in_threadpool(run_method, method, params, run_sync)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def batch_infer(self, request: Request, model: str, images: str = "unlabeled") -> Any:
        """``POST /batch/infer/{model}``: start pre-annotating (``lib.serving.preannotate``); params as /infer."""
        try:
            if model not in self.app._infers:
                raise HTTPException(
                    status_code=404, detail=f"unknown model {model!r}; available models: {', '.join(self.app._infers)}"
                )
            if images not in IMAGE_SETS:
                raise HTTPException(
                    status_code=422, detail=f"images: expected one of {', '.join(IMAGE_SETS)}; got {images[:40]!r}"
                )
            body = await self._json_body(request, "batch inference request")
            force = parse_bool(body.pop("force", False), "force")
            image_ids = body.pop("image_ids", None)
            if image_ids is not None:
                if not isinstance(image_ids, list) or not image_ids or len(image_ids) > 100_000:
                    raise HTTPException(status_code=422, detail="image_ids: expected a non-empty list of image ids")
                image_ids = [check_id(str(i)) for i in image_ids]
            params = check_params(body, INFER_FIELDS, "batch inference request")
            return await run_in_threadpool(self.preannotation.start, model, images, image_ids, params, force)
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def next_sample(self, request: Request, strategy: str, user: User | None = None) -> Any:
        try:
            params = await self._json_body(request, "active learning request")
            from monailabel.endpoints.activelearning import sample

            return await run_in_threadpool(sample, strategy, params, getattr(user, "username", None))
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e

    async def create_session(self, request: Request, uncompress: bool = False, expiry: int = 0) -> dict:
        """``PUT /session/``: files stored in the session; archives extracted only after every member is checked."""
        folder = tempfile.mkdtemp(prefix="unet_seg-session-")
        try:
            form = await request.form(max_files=64, max_fields=8)
            paths = []
            try:
                for key, value in form.multi_items():
                    if not isinstance(value, UploadFile) or key != "files":
                        continue
                    name = os.path.basename(value.filename or "") or f"file{len(paths)}"
                    if not SAFE_NAME.match(name):
                        raise HTTPException(
                            status_code=422,
                            detail=f"file name {name[:60]!r}: use letters, digits, '.', '_' and '-' only",
                        )
                    path = os.path.join(folder, name)
                    with open(path, "wb") as out:
                        await run_in_threadpool(shutil.copyfileobj, value.file, out, 1024 * 1024)
                    paths.append(path)
            finally:
                await form.close()
            if not paths:
                raise HTTPException(status_code=422, detail="files: upload the image file(s) as form field 'files'")
            if not 0 <= expiry <= 86400:
                raise HTTPException(status_code=422, detail=f"expiry: must be in [0, 86400] seconds, got {expiry}")
            if uncompress:
                if len(paths) != 1:
                    raise HTTPException(status_code=422, detail="uncompress: send exactly one archive")
                await run_in_threadpool(check_archive, paths[0], self.limits.max_upload_bytes)
            sessions = self.app.sessions()
            if sessions is None:
                raise HTTPException(status_code=409, detail="sessions are switched off on this server")
            source = paths[0] if len(paths) == 1 else folder
            session_id, info = await run_in_threadpool(sessions.add_session, source, expiry, uncompress)
            return {
                "session_id": session_id,
                "session_info": {k: v for k, v in info.to_json().items() if k not in ("path", "image")},
            }
        except Exception as e:  # noqa: BLE001
            raise http_error(e) from e
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def token(self, request: Request) -> Response:
        """``POST /auth/token`` (form username, password): the realm's token, 401 for bad credentials (never 500)."""
        from monailabel.config import settings as ml_settings

        from .security import token_from_realm

        if not ml_settings.MONAI_LABEL_AUTH_ENABLE:
            return JSONResponse({"access_token": None, "token_type": None})
        form = await request.form(max_files=0, max_fields=8)
        username, password = str(form.get("username") or ""), str(form.get("password") or "")
        if not username or not password:
            raise HTTPException(status_code=422, detail="username and password are required (form fields)")
        try:
            status, body = await run_in_threadpool(
                token_from_realm,
                ml_settings.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"),
                ml_settings.MONAI_LABEL_AUTH_CLIENT_ID,
                username,
                password,
            )
        except Exception as e:  # noqa: BLE001 - the realm is down or answers nonsense: say so, never a traceback
            logger.error(f"/auth/token: the realm failed: {type(e).__name__}: {e}")
            raise HTTPException(
                status_code=502, detail="the login service (realm) did not answer; try again later"
            ) from e
        return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    # ---- installation -----------------------------------------------------------------------
    def install(self, fastapi_app: FastAPI, extra: Callable[[Any], RouteTable] | None = None) -> None:
        """Put these routes (and ``extra(admin_dependency)``'s) in front of MONAI Label's.

        Same paths and auth dependency.
        """
        user = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
        annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
        admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
        routes = self

        async def infer(
            request: Request,
            model: str,
            image: str = "",
            session_id: str = "",
            output: str | None = None,
            u: User = user,
        ) -> Response:
            return await routes.infer(request, model, image, session_id, output)

        async def add_image(request: Request, image: str | None = None, u: User = annotator) -> dict:
            return await routes.add_image(request, image, u)

        async def save_label(request: Request, image: str, tag: str = "final", u: User = annotator) -> dict:
            return await routes.save_label(request, image, tag, u)

        async def train(
            request: Request, model: str, run_sync: bool = False, enqueue: bool = False, u: User = admin
        ) -> Any:
            return await routes.train(request, model, run_sync, enqueue)

        async def train_all(request: Request, run_sync: bool = False, u: User = admin) -> Any:
            return await routes.train_all(request, run_sync)

        async def next_sample(request: Request, strategy: str, u: User = user) -> Any:
            return await routes.next_sample(request, strategy, u)

        async def scoring(request: Request, method: str, run_sync: bool = False, u: User = annotator) -> Any:
            return await routes.scoring(request, method, run_sync)

        async def batch_infer(request: Request, model: str, images: str = "unlabeled", u: User = admin) -> Any:
            return await routes.batch_infer(request, model, images)

        async def download_image(image: str, check_only: bool = False, u: User = user) -> Response:
            return await routes.download_image(image, check_only)

        async def download_label(label: str, tag: str = "final", check_only: bool = False, u: User = user) -> Response:
            return await routes.download_label(label, tag, check_only)

        async def batch_status(u: User = user) -> dict:
            return routes.preannotation.status()

        async def batch_stop(u: User = admin) -> dict:
            return routes.preannotation.stop()

        async def token(request: Request) -> Response:
            return await routes.token(request)

        async def create_session(request: Request, uncompress: bool = False, expiry: int = 0, u: User = admin) -> dict:
            return await routes.create_session(request, uncompress, expiry)

        async def no_wsi(model: str) -> Any:
            raise HTTPException(
                status_code=404,
                detail=f"no whole-slide (WSI) models are served; use POST /infer/{{model}} "
                f"with models: {', '.join(routes.app._infers)}",
            )

        # a PACS may keep the datastore's counts waiting: then off the event loop; local files answer at once there
        remote = routes.app.studies.startswith(("http://", "https://"))

        async def info(u: User = user) -> Any:
            return await run_in_threadpool(app_info) if remote else app_info()

        async def listing(output: ResultType | None = None, u: User = user) -> Any:
            return await run_in_threadpool(datastore_listing, output) if remote else datastore_listing(output)

        table: RouteTable = [
            ("/info/", ["GET"], info),
            ("/datastore/", ["GET"], listing),
            ("/auth/token", ["POST"], token),
            ("/session/", ["PUT"], create_session),
            ("/infer/wsi/{model}", ["POST"], no_wsi),  # MONAI Label's WSI routes read any server path given as image
            ("/infer/wsi_v2/{model}", ["POST"], no_wsi),
            ("/infer/{model}", ["POST"], infer),
            ("/datastore/image", ["PUT"], add_image),
            ("/datastore/image", ["GET"], download_image),
            ("/datastore/label", ["GET"], download_label),
            ("/datastore/", ["PUT"], add_image),
            ("/datastore/label", ["PUT"], save_label),
            ("/train/{model}", ["POST"], train),
            ("/train/", ["POST"], train_all),
            ("/activelearning/{strategy}", ["POST"], next_sample),
            ("/scoring/{method}", ["POST"], scoring),
            ("/batch/infer/{model}", ["POST"], batch_infer),
            ("/batch/infer/", ["GET"], batch_status),
            ("/batch/infer/", ["DELETE"], batch_stop),
        ]
        table += extra(admin) if extra else []
        new = [
            # so the app's auth overrides apply here too
            APIRoute(
                path,
                fn,
                methods=methods,
                include_in_schema=(path, methods) != ("/datastore/", ["PUT"]),
                dependency_overrides_provider=fastapi_app,
            )
            for path, methods, fn in table
        ]
        fastapi_app.router.routes[:0] = new
        fastapi_app.add_exception_handler(requests.exceptions.RequestException, pacs_fault_reply)
        logger.info(
            f"unet_seg routes installed: {', '.join(p for p, _, _ in table)}; "
            f"inference workers {self.executor.workers}, queue {self.executor.queue}"
        )
