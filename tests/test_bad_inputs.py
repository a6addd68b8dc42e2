"""Bad inputs against a REAL server: every malformed upload, inference file, request parameter and
training body gets a clear 4xx naming the problem, nothing stored is touched, no temp file is left
behind, and the server keeps serving.

The server serves the embedded sample (six hippocampus studies, four labelled) with the READY
pretrained UNet3D of ``sample/models`` and the upload limits ``max_upload_mb 8`` /
``max_voxels 20000000``; its TMPDIR is a private empty folder. The inputs come from
``tests/badinputs.py`` (``python tests/badinputs.py`` prints them). Run with ``-s`` for the totals.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from badinputs import (
    INFER_IMAGE_ID,
    LABEL_IMAGE_ID,
    MAX_UPLOAD_MB,
    MAX_VOXELS,
    BadInput,
    BadParam,
    BadTrain,
    bad_inputs,
    bad_params,
    bad_train_bodies,
    check,
    detail_text,
    good_image,
    good_label,
    has_keyword,
    mentions_all,
)
from conftest import ROOT, Server, running_server

SAMPLE = ROOT / "sample" / "studies"
SAMPLE_LABEL = SAMPLE / "labels" / "final" / f"{LABEL_IMAGE_ID}.nii.gz"
PRETRAINED = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
TIMEOUT = 60  # seconds per request; a correct server answers a bad input in well under a second
CHANNELS = ("image", "label", "infer")
LIVE = ("SUBMITTED", "RUNNING", "QUEUED")
VERBOSE = os.environ.get("BADINPUTS_VERBOSE") == "1"  # with -s: one line per reply (status and detail)

INPUTS = bad_inputs()
CASES = [(b, ch) for b in INPUTS for ch in CHANNELS if ch in b.targets]
PARAMS = bad_params()
TRAIN = bad_train_bodies()


@dataclass
class Ctx:
    server: Server
    base: Path
    studies: Path
    tmpdir: Path
    labels_before: dict[str, bytes]
    ids_before: set[str]
    # what the server left in its TMPDIR while starting (MONAI Label's logging config, torch's cache dir)
    tmp_at_start: set[str]
    # where a '../../etc/x.nii.gz' name could land; existed before?
    escape_targets: dict[Path, bool] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url


def datastore_ids(url: str) -> set[str]:
    r = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30)
    r.raise_for_status()
    return set(r.json()["objects"])


def label_files(studies: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((studies / "labels" / "final").iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("badinputs")
    studies = base / "studies"
    shutil.copytree(SAMPLE, studies)
    tmpdir = base / "server_tmp"
    tmpdir.mkdir()
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "unet3d.pretrained": str(PRETRAINED),
        "tracking": "none",
        "model_dir": str(base / "model"),
        "max_upload_mb": str(MAX_UPLOAD_MB),
        "max_voxels": str(MAX_VOXELS),
        "auto_retrain_after": "0",
        "admin_without_auth": "true",  # the cases clean up with DELETE /datastore/image
    }
    print(
        f"\nbad inputs: {len(INPUTS)} inputs -> {len(CASES)} upload/infer cases; {len(PARAMS)} bad /infer requests; "
        f"{len(TRAIN)} bad /train bodies; {len(CASES) + len(PARAMS) + len(TRAIN)} cases in all"
    )
    with running_server(studies, conf, base / "server.log", env={"TMPDIR": str(tmpdir)}) as srv:
        escape = {
            (d / "../../etc/x.nii.gz").resolve()
            for d in (studies, studies / "labels" / "final", tmpdir, ROOT, ROOT / "apps" / "unet_seg")
        }
        at_start = {str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*")}
        print(f"server TMPDIR after start-up: {sorted(at_start) or 'empty'}")
        yield Ctx(
            server=srv,
            base=base,
            studies=studies,
            tmpdir=tmpdir,
            labels_before=label_files(studies),
            ids_before=datastore_ids(srv.url),
            tmp_at_start=at_start,
            escape_targets={p: p.exists() for p in escape},
        )


def forbidden_paths(c: Ctx) -> list[str]:
    """Server-side absolute paths a reply must never show."""
    paths = {str(c.studies), str(c.studies.resolve()), str(c.tmpdir), str(c.tmpdir.resolve())}
    return sorted(paths, key=len)


def reply_problems(
    c: Ctx,
    r: requests.Response,
    status: int,
    also: tuple[int, ...],
    keywords: tuple[str, ...],
    mentions: tuple[str, ...] = (),
) -> list[str]:
    """What is wrong with a reply to a bad request (empty when it is right)."""
    problems = []
    try:
        text = detail_text(r.json())
    except ValueError:
        text = r.text.lower() if r.headers.get("content-type", "").startswith("text/") else ""
    short = " ".join(text.split())[:300] or f"<{len(r.content)} bytes of {r.headers.get('content-type', '?')}>"
    if VERBOSE:
        print(f"\n    -> {r.status_code} {short[:200]}", end="")
    if not 400 <= r.status_code < 500:
        problems.append(f"status {r.status_code}, expected {status}: {short!r}")
    elif r.status_code != status and r.status_code not in also:
        problems.append(f"status {r.status_code}, expected {status}{' or ' + str(also) if also else ''}: {short!r}")
    elif not has_keyword(text, keywords):
        problems.append(f"detail lacks any of {keywords}: {short!r}")
    elif mentions and not mentions_all(text, mentions):
        problems.append(f"detail does not name {mentions}: {short!r}")
    leaked = [p for p in forbidden_paths(c) if p.encode() in r.content]
    if leaked:
        problems.append(f"reply shows server paths {leaked}")
    return problems


def still_serving(c: Ctx) -> list[str]:
    try:
        r = requests.get(f"{c.url}/info/", timeout=30)
    except requests.RequestException as e:
        return [f"GET /info/ failed afterwards: {type(e).__name__}: {e}"]
    return [] if r.status_code == 200 else [f"GET /info/ answered {r.status_code} afterwards"]


def send(c: Ctx, bad: BadInput, channel: str) -> requests.Response:
    upload = (bad.filename, bad.payload, "application/octet-stream")
    form = {"params": "{}"}
    if channel == "image":
        return requests.put(
            f"{c.url}/datastore/image",
            params={"image": f"bad_{bad.name}"},
            files={"file": upload},
            data=form,
            timeout=TIMEOUT,
        )
    if channel == "label":
        return requests.put(
            f"{c.url}/datastore/label",
            params={"image": LABEL_IMAGE_ID, "tag": "final"},
            files={"label": upload},
            data=form,
            timeout=TIMEOUT,
        )
    return requests.post(
        f"{c.url}/infer/unet3d", params={"output": "image"}, files={"file": upload}, data=form, timeout=TIMEOUT
    )


# ---- the generator itself (no server) -------------------------------------------------------------


def test_generator_is_sound() -> None:
    assert check() == []
    assert len(INPUTS) >= 60 and len(CASES) > 100
    assert len({b.name for b in INPUTS}) == len(INPUTS)
    assert len({p.name for p in PARAMS}) == len(PARAMS) and len({t.name for t in TRAIN}) == len(TRAIN)
    oversized = [b for b in INPUTS if len(b.payload) > MAX_UPLOAD_MB << 20]
    assert [b.name for b in oversized] == ["oversized_random"]  # every other input is within the byte limit
    assert all(b.status == 413 for b in oversized)


# ---- controls: the good bases are accepted (so each defect is what is refused) ------------------------


def test_controls_accepted(ctx: Ctx, tmp_path: Path) -> None:
    url = ctx.url
    r = requests.put(
        f"{url}/datastore/image",
        params={"image": "ctl_good_image"},
        files={"file": ("good.nii.gz", good_image())},
        data={"params": "{}"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    r = requests.put(
        f"{url}/datastore/label",
        params={"image": "ctl_good_image", "tag": "final"},
        files={"label": ("good.nii.gz", good_label())},
        data={"params": "{}"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    r = requests.delete(f"{url}/datastore/image", params={"id": "ctl_good_image"}, timeout=30)  # its label goes with it
    assert r.status_code == 200, r.text
    r = requests.post(
        f"{url}/infer/unet3d",
        params={"output": "image"},
        files={"file": ("good.nii.gz", good_image())},
        data={"params": "{}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(r.content)
    assert nib.load(out).shape == nib.load(SAMPLE / f"{LABEL_IMAGE_ID}.nii.gz").shape


# ---- every bad file through every channel it is bad for ---------------------------------------------


@pytest.mark.parametrize("bad,channel", CASES, ids=[f"{b.name}-{ch}" for b, ch in CASES])
def test_bad_input_rejected(ctx: Ctx, bad: BadInput, channel: str) -> None:
    labels_before = label_files(ctx.studies) if channel == "label" else {}
    try:
        r = send(ctx, bad, channel)
    except requests.RequestException as e:
        pytest.fail(f"no reply: {type(e).__name__}: {e}; " + "; ".join(still_serving(ctx)))
    if bad.ok_allowed and 200 <= r.status_code < 300:
        if VERBOSE:
            print(f"\n    -> {r.status_code} (accepted; allowed for this input)", end="")
        problems = [
            f"stored outside the datastore: {p}"
            for p, existed in ctx.escape_targets.items()
            if p.exists() and not existed
        ]
        if channel == "image":  # accepted under its (sanitised) name: remove it again
            requests.delete(f"{ctx.url}/datastore/image", params={"id": f"bad_{bad.name}"}, timeout=30)
        leaked = [p for p in forbidden_paths(ctx) if p.encode() in r.content]
        problems += [f"reply shows server paths {leaked}"] if leaked else []
        if channel == "label":  # a good label was stored (the server may re-encode it): same voxels, new baseline
            stored = ctx.studies / "labels" / "final" / f"{LABEL_IMAGE_ID}.nii.gz"
            if not np.array_equal(
                np.asanyarray(nib.load(stored).dataobj), np.asanyarray(nib.load(SAMPLE_LABEL).dataobj)
            ):
                problems.append("the accepted label's voxels differ from the upload's")
            if labels_before.get(stored.name) == ctx.labels_before.get(
                stored.name
            ):  # not already changed by an earlier case
                ctx.labels_before[stored.name] = stored.read_bytes()
            labels_before[stored.name] = stored.read_bytes()
    else:
        problems = reply_problems(ctx, r, bad.status, bad.also_status, bad.keywords, bad.mentions)
        if channel == "image" and r.status_code >= 400:
            leftovers = sorted(p.name for p in ctx.studies.glob(f"bad_{bad.name}*"))
            problems += [f"rejected upload left files in the studies folder: {leftovers}"] if leftovers else []
    if channel == "label":
        changed = sorted(n for n, b in label_files(ctx.studies).items() if labels_before.get(n) != b)
        problems += [f"this upload changed or added stored label files: {changed}"] if changed else []
    problems += still_serving(ctx)
    assert not problems, "; ".join(problems)


# ---- bad /infer request parameters on a good study ---------------------------------------------------


@pytest.mark.parametrize("bp", PARAMS, ids=[p.name for p in PARAMS])
def test_bad_infer_request_rejected(ctx: Ctx, bp: BadParam) -> None:
    form = {"params": bp.params} if bp.params is not None else {}
    if bp.encoding == "multipart":  # a multipart form with a text field and no file, as MONAI Label clients send
        kwargs: dict = {"files": {k: (None, v) for k, v in form.items()} or {"params": (None, "{}")}}
    else:
        kwargs = {"data": form}
    try:
        r = requests.post(f"{ctx.url}/infer/unet3d", params=bp.query, timeout=TIMEOUT, **kwargs)
    except requests.RequestException as e:
        pytest.fail(f"no reply: {type(e).__name__}: {e}; " + "; ".join(still_serving(ctx)))
    problems = reply_problems(ctx, r, bp.status, bp.also_status, bp.keywords) + still_serving(ctx)
    assert not problems, "; ".join(problems)


# ---- bad /train bodies: refused, and no training task left behind ------------------------------------


def train_tasks(url: str) -> list[dict]:
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=30)
    if r.status_code == 404:  # no task ever
        return []
    r.raise_for_status()
    body = r.json()
    return body if isinstance(body, list) else [body]


@pytest.mark.parametrize("bt", TRAIN, ids=[t.name for t in TRAIN])
def test_bad_train_body_rejected(ctx: Ctx, bt: BadTrain) -> None:
    before = {t.get("id") for t in train_tasks(ctx.url)}
    try:
        r = requests.post(
            f"{ctx.url}/train/unet3d", data=bt.body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
        )
    except requests.RequestException as e:
        pytest.fail(f"no reply: {type(e).__name__}: {e}; " + "; ".join(still_serving(ctx)))
    problems = reply_problems(ctx, r, bt.status, (), bt.keywords)
    started = [t for t in train_tasks(ctx.url) if t.get("id") not in before and t.get("status") in LIVE]
    if started:
        problems.append(f"a training task was started: {[(t.get('id'), t.get('status')) for t in started]}")
        requests.delete(f"{ctx.url}/train/", timeout=60)  # stop it so the other cases run on an idle server
        end = time.time() + 60
        while time.time() < end and any(t.get("status") in LIVE for t in train_tasks(ctx.url)):
            time.sleep(1)
    problems += still_serving(ctx)
    assert not problems, "; ".join(problems)


# ---- afterwards: nothing stored touched, nothing left behind, still serving ------------------------------


def test_chunked_upload_over_the_limit_is_cut_off_while_streaming(ctx: Ctx) -> None:
    """No Content-Length (chunked): the server counts while reading and stops at the limit."""
    total = 64 * 1024 * 1024  # 8x the limit
    sent = {"bytes": 0}

    def body() -> Iterator[bytes]:  # a well-formed multipart start, then a file part that never ends
        yield (
            b'--unetsegboundary\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        chunk = b"\0" * (1024 * 1024)
        for _ in range(total // len(chunk)):
            sent["bytes"] += len(chunk)
            yield chunk

    try:
        r = requests.put(
            f"{ctx.url}/datastore/image",
            params={"image": "bad_chunked"},
            data=body(),
            headers={"Content-Type": "multipart/form-data; boundary=unetsegboundary"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 413, r.text
        assert "too large" in r.json()["detail"]
    except requests.ConnectionError:
        # the server answered 413 and closed the connection while the client was still sending
        assert sent["bytes"] < total
    assert requests.get(f"{ctx.url}/info/", timeout=30).status_code == 200


def test_after_all_labels_untouched(ctx: Ctx) -> None:
    """Every stored label file byte-identical to before.

    A good label accepted under a sanitised name resets the baseline.
    """
    after = label_files(ctx.studies)
    changed = sorted(n for n in ctx.labels_before if after.get(n) != ctx.labels_before[n])
    added = sorted(set(after) - set(ctx.labels_before))
    assert not changed and not added, f"label files changed: {changed}; added: {added}"


def test_after_all_datastore_unchanged(ctx: Ctx) -> None:
    ids = datastore_ids(ctx.url)
    assert not [i for i in ids if i.startswith("bad_")], (
        f"bad uploads stored: {sorted(i for i in ids if i.startswith('bad_'))}"
    )
    assert ids == ctx.ids_before, f"added: {sorted(ids - ctx.ids_before)}; missing: {sorted(ctx.ids_before - ids)}"
    assert sorted(p.name for p in ctx.studies.iterdir() if p.name.startswith("bad_")) == []


def test_after_all_no_temp_files_left(ctx: Ctx) -> None:
    """Nothing the requests made is left in the server's TMPDIR (start-up leftovers are reported, not counted)."""

    def left() -> list[str]:
        return sorted(
            str(p.relative_to(ctx.tmpdir))
            for p in ctx.tmpdir.rglob("*")
            if str(p.relative_to(ctx.tmpdir)) not in ctx.tmp_at_start
        )

    end = time.time() + 5  # background clean-up after the last reply
    remaining = left()
    while remaining and time.time() < end:
        time.sleep(0.5)
        remaining = left()
    assert not remaining, f"{len(remaining)} temp files left in the server's TMPDIR: {remaining[:10]}"


def test_after_all_good_inference_still_works(ctx: Ctx, tmp_path: Path) -> None:
    assert requests.get(f"{ctx.url}/info/", timeout=30).status_code == 200
    r = requests.post(
        f"{ctx.url}/infer/unet3d",
        params={"image": INFER_IMAGE_ID, "output": "image"},
        data={"params": json.dumps({})},
        timeout=300,
    )
    assert r.status_code == 200, r.text[:500]
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(r.content)
    seg = nib.load(out)
    src = nib.load(ctx.studies / f"{INFER_IMAGE_ID}.nii.gz")
    assert seg.shape == src.shape
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2}
