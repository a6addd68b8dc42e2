"""A scripted clinician session against a REMOTE unet_seg server, through the module's Logic; prints a JSON report.

Runs in Slicer's Python or in plain Python with ``slicer-core`` (the tests use .venv-slicer, inside
a mount namespace where the server's folders are hidden under an empty tmpfs):

    python remote_session.py --url URL --cache DIR --out DIR --scenario NAME [--hidden DIR ...]
                             [--probe FILE] [--args JSON]

``--hidden`` folders must look empty here and ``--probe`` (a server file) must be unreadable; the
report says so, which proves nothing of the server's can be read by this process. Scenarios:

* ``loop``: Next study (download) -> Segment -> import into a segmentation -> export -> Submit ->
  Train (1 epoch) -> progress until done -> versions overview and plot nodes.
* ``upload``: a volume FILE and a volume NODE (``args.volume``) uploaded as new studies,
  segmented and submitted as their final labels.
* ``preannotated``: Next study opens the stored prediction of the serving version.
* ``multimodal``: per-modality volumes (``args.modalities``) stacked and uploaded; the study opened
  again comes back as one volume per modality; volumes on different grids are refused.
* ``timing``: Next study twice on the same study (``lease_s`` 0): download, then the cache.
* ``auth``: login errors in words, login, the loop as an annotator, 403 for training, renewal
  before expiry and after a 401 (``args.bad_token``), logout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import UNetSeg  # noqa: E402
from UNetSegLib import REFRESH_MARGIN_S, ServerError, model_modalities, sha256_of  # noqa: E402


class Session:
    """The Logic plus a slicer-core scene, and the raw replies of /activelearning as the server sent them."""

    def __init__(self, url: str, cache: str) -> None:
        self.logic = UNetSeg.UNetSegLogic(url, timeout=120, cache_dir=cache)
        self.errors: list[str] = []
        self.raw_samples: list[dict] = []
        try:
            import slicer

            self.logic.scene = slicer.vtkMRMLScene()
            self.logic.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
            self.logic.segmentations_logic.SetMRMLScene(self.logic.scene)
        except ImportError:  # plain Python: no scene steps
            pass
        self.logic.client.session.hooks["response"].append(self._observe)

    def _observe(self, r: Any, *args: Any, **kwargs: Any) -> Any:
        if "/activelearning/" in r.url and r.status_code == 200:
            self.raw_samples.append(r.json())
        return r

    @property
    def has_scene(self) -> bool:
        return self.logic.scene is not None

    def call(self, start: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one Logic call to its end; returns its result, or raises ``RuntimeError(message in words)``."""
        got: dict[str, Any] = {}
        errors: list[str] = []
        try:
            start(*args, lambda r: got.update(result=r), errors.append, **kwargs)
        except (ValueError, OSError) as e:  # refused before any request (as the widget shows it)
            errors.append(UNetSeg.plain_words(e))
        self.logic.wait(900)
        if errors:
            self.errors.append(errors[-1])
            raise RuntimeError(errors[-1])
        return got["result"]

    def error_of(self, start: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        try:
            self.call(start, *args, **kwargs)
        except RuntimeError as e:
            return str(e)
        return ""


def check_hidden(hidden: list[str], probe: str | None) -> dict:
    out: dict[str, Any] = {"hidden_empty": {h: os.listdir(h) == [] for h in hidden}}
    if probe:
        try:
            with open(probe, "rb"):
                out["probe_readable"] = True
        except OSError:
            out["probe_readable"] = False
    return out


def segment_and_submit(s: Session, image: str, volume: Any, model: str, out: str) -> dict:
    """Segment the current study, import the label into a segmentation on ``volume``, export it, submit it."""
    seg = s.call(s.logic.segment, model, False)
    rep: dict[str, Any] = {"label": seg["label"], "label_names": seg["label_names"], "meta": seg["meta"]}
    if s.has_scene and volume is not None:
        segmentation = s.logic.import_label(seg["label"], seg["label_names"], volume)
        exported = s.logic.export_label(segmentation, volume, seg["label_names"])
        rep["exported"] = exported
        rep["segments"] = sorted(
            segmentation.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
        )
    else:
        exported = seg["label"]
    rep["submit"] = s.call(s.logic.submit_label, exported, seg["label_names"])
    rep["submitted_sha256"] = sha256_of(exported)
    return rep


def scenario_loop(s: Session, args: dict, out: str) -> dict:
    rep: dict[str, Any] = {"connect": s.call(s.logic.connect)["strategies"]}
    nxt = s.call(s.logic.next_study, "first", "unet3d")
    rep["next"] = nxt
    rep["current_keys"] = sorted(s.logic.current)
    rep["image_sha256"] = sha256_of(nxt["images"][0])
    volume = s.logic.load_volumes(nxt["images"], [nxt["id"]])[0] if s.has_scene else None
    rep["segment"] = segment_and_submit(s, nxt["id"], volume, "unet3d", out)
    s.call(s.logic.train, "unet3d", **args.get("train", {"max_epochs": 1}))
    end = time.time() + 900
    progress: dict = {}
    while time.time() < end:
        progress = s.call(s.logic.training_progress, "unet3d")
        if progress["status"] not in ("SUBMITTED", "RUNNING", "QUEUED", "none"):
            break
        time.sleep(2)
    rep["progress"] = progress
    ov = s.call(s.logic.fetch_overview)
    rep["overview"] = ov.get("unet3d")
    if s.has_scene:
        curve, bars = s.logic.plot_overview("unet3d", ov["unet3d"])
        rep["plot"] = {
            "curve_series": curve.GetNumberOfPlotSeriesNodes(),
            "curve_rows": curve.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows(),
            "class_rows": bars.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows(),
            "class_labels": [
                bars.GetNthPlotSeriesNode(0).GetTableNode().GetCellText(i, 1)
                for i in range(bars.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows())
            ],
        }
    return rep


def scenario_upload(s: Session, args: dict, out: str) -> dict:
    s.call(s.logic.connect)
    rep: dict[str, Any] = {}
    s.call(s.logic.upload_volumes, [args["volume"]], "oblique_file", model="unet3d")
    rep["file"] = segment_and_submit(s, "oblique_file", None, "unet3d", out)
    if s.has_scene:
        import UNetSegScene

        node = UNetSegScene.read_volume(s.logic.scene, args["volume"], name="oblique volume in Slicer")
        up = s.call(s.logic.upload_volumes, [node], "oblique_node", model="unet3d")
        rep["node"] = segment_and_submit(s, "oblique_node", node, "unet3d", out)
        rep["node"]["uploaded"] = up["uploaded"]
    rep["duplicate_error"] = s.error_of(s.logic.upload_volumes, [args["volume"]], "oblique_file", model="unet3d")
    return rep


def scenario_preannotated(s: Session, args: dict, out: str) -> dict:
    s.call(s.logic.connect)
    nxt = s.call(s.logic.next_study, "first", "unet3d")
    rep: dict[str, Any] = {"next": nxt}
    if s.has_scene and nxt["label"]:
        volume = s.logic.load_volumes(nxt["images"], [nxt["id"]])[0]
        segmentation = s.logic.import_label(nxt["label"], nxt["label_names"], volume)
        rep["segments"] = segmentation.GetSegmentation().GetNumberOfSegments()
    return rep


def scenario_multimodal(s: Session, args: dict, out: str) -> dict:
    connect = s.call(s.logic.connect)
    rep: dict[str, Any] = {"modalities": model_modalities(connect["models"]["unet3d"])}
    rep["wrong_count"] = s.error_of(s.logic.upload_volumes, args["modalities"][:1], "mm_one", model="unet3d")
    rep["misaligned"] = s.error_of(s.logic.upload_volumes, args["misaligned"], "mm_bad", model="unet3d")
    rep["upload"] = s.call(s.logic.upload_volumes, args["modalities"], "mm_case", model="unet3d")
    rep["open"] = s.call(s.logic.open_study, "mm_case", "unet3d")
    if s.has_scene:
        nodes = s.logic.load_volumes(rep["open"]["images"], rep["open"]["modalities"])
        rep["nodes"] = [n.GetName() for n in nodes]
    return rep


def scenario_timing(s: Session, args: dict, out: str) -> dict:
    s.call(s.logic.connect)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        nxt = s.call(s.logic.next_study, "first", None, lease_s=0)
        runs.append({"wall_s": time.perf_counter() - t0, **nxt})
    out: dict[str, Any] = {"runs": runs}
    if s.has_scene:  # what Slicer does next: read the volume into the scene (not part of the 2 s budget)
        t0 = time.perf_counter()
        s.logic.load_volumes(runs[-1]["images"])
        out["scene_load_s"] = time.perf_counter() - t0
    return out


def scenario_auth(s: Session, args: dict, out: str) -> dict:
    logic, client = s.logic, s.logic.client
    rep: dict[str, Any] = {"not_logged_in": s.error_of(logic.connect)}
    rep["wrong_password"] = s.error_of(logic.login, args["user"], "wrong")
    rep["login"] = {k: v for k, v in s.call(logic.login, args["user"], args["password"]).items() if k != "models"}
    rep["logins_after_login"] = client.logins
    nxt = s.call(logic.next_study, "first", "unet3d")
    rep["next"] = nxt["id"]
    volume = logic.load_volumes(nxt["images"], [nxt["id"]])[0] if s.has_scene else None
    rep["segment"] = segment_and_submit(s, nxt["id"], volume, "unet3d", out)
    rep["train_forbidden"] = s.error_of(logic.train, "unet3d", max_epochs=1)
    # renewal before expiry: wait until the token is within the margin, then any call renews it first
    before, token = client.logins, client.token
    while client.token_expires_at - time.time() >= REFRESH_MARGIN_S:
        time.sleep(0.5)
    s.call(logic.fetch_overview)
    rep["renewed_before_expiry"] = {"logins": client.logins - before, "token_changed": client.token != token}
    # a token the server refuses (signed by another key): one 401, a new login, the call repeated
    before = client.logins
    client.token = args["bad_token"]
    client.token_expires_at = time.time() + 3600
    s.call(logic.fetch_overview)
    rep["renewed_after_401"] = {"logins": client.logins - before, "token_changed": client.token != args["bad_token"]}
    client.logout()
    rep["after_logout"] = s.error_of(logic.fetch_overview)
    return rep


SCENARIOS = {
    "loop": scenario_loop,
    "upload": scenario_upload,
    "preannotated": scenario_preannotated,
    "multimodal": scenario_multimodal,
    "timing": scenario_timing,
    "auth": scenario_auth,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--hidden", nargs="*", default=[])
    ap.add_argument("--probe", default=None)
    ap.add_argument("--args", default="{}")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    s = Session(a.url, a.cache)
    report: dict[str, Any] = {"visibility": check_hidden(a.hidden, a.probe)}
    try:
        report["result"] = SCENARIOS[a.scenario](s, json.loads(a.args), a.out)
    except (RuntimeError, ServerError, ValueError) as e:
        report["failed"] = f"{type(e).__name__}: {e}"
    report["raw_samples"] = s.raw_samples
    report["errors"] = s.errors
    s.logic.pool.shutdown(wait=True)  # not close(): the work folder (labels, exports) is for the caller to check
    s.logic.client.logout()
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
