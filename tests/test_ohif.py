"""OHIF in a real browser: the OHIF v3 build that MONAI Label serves at ``/ohif/``, in headless Debian Chromium
(selenium + chromium-driver, installed by ``scripts/browser.sh install``), against this server on a real PACS
(Orthanc started by scripts/orthanc.sh, the sample volumes stored as MR series).

The study list shows the sample studies; a study renders in the viewer (non-blank canvas); in the MONAI Label mode
the panel is pointed at this server, runs ``unet3d`` and the segmentation shows in the viewports with the same
voxels per segment as the server's own ``/infer`` answer. Screenshots go to a folder the test prints;
``UNET_SEG_SAVE_SCREENSHOTS=1`` also copies the segmentation screenshot to ``docs/ohif_segmentation.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT, Server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--window-size=1400,900",
]
WAIT_S = 90  # generous: 2 shared cores, software WebGL

# Per shown cornerstone canvas (a viewport; not the hidden ones OHIF renders thumbnails with): distinct grey
# values, non-black pixels, and "coloured" pixels (a segment overlay; the MR itself is pure grey, r == g == b).
CANVAS_STATS_JS = """
const shown = c => {
  const r = c.getBoundingClientRect();
  return c.checkVisibility() && r.width > 100 && r.height > 100;
};
return Array.from(document.querySelectorAll('canvas.cornerstone-canvas')).filter(shown).map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const greys = new Set(); let lit = 0, coloured = 0;
  for (let i = 0; i < d.length; i += 4) {
    const r = d[i], g = d[i + 1], b = d[i + 2];
    if (r || g || b) lit++;
    if (r === g && g === b) greys.add(r);
    else if (Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
  }
  return {width: c.width, height: c.height, greys: greys.size, lit: lit, coloured: coloured};
});
"""

# The labelmap segmentations of the viewer (cornerstone3D, exposed by OHIF as window.cornerstoneTools): segment
# names and voxel counts per segment index.
SEGMENTATIONS_JS = """
const segs = window.cornerstoneTools ? window.cornerstoneTools.segmentation.state.getSegmentations() : [];
return segs.map(s => {
  const names = {};
  for (const x of Object.values(s.segments)) names[x.segmentIndex] = x.label;
  const counts = {};
  const lm = s.representationData && s.representationData.Labelmap;
  const vol = lm && lm.volumeId ? window.cornerstone.cache.getVolume(lm.volumeId) : null;
  if (vol) {
    const a = vol.voxelManager.getCompleteScalarDataArray();
    for (let i = 0; i < a.length; i++) if (a[i]) counts[a[i]] = (counts[a[i]] || 0) + 1;
  }
  return {id: s.segmentationId, names: names, counts: counts, dims: vol ? vol.dimensions : null};
});
"""


# ---- a real PACS and the server on it (as in test_pacs.py) ---------------------------------------------


# ---- the browser ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ohif_screenshots")
    print(f"\nOHIF screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's Chromium, headless with software WebGL, through Debian's chromedriver (nothing downloaded)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} missing: run `bash scripts/browser.sh install`"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every chromium process it started


Check = Callable[[webdriver.Chrome], Any]


def wait_for(driver: webdriver.Chrome, what: str, check: Check, timeout: float = WAIT_S) -> Any:
    """``check(driver)``'s first truthy value within ``timeout`` s (re-finding elements a re-render replaced)."""
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException])
    try:
        return waiting.until(check)
    except TimeoutException:
        errors = [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        raise AssertionError(f"OHIF: {what} not seen within {timeout:.0f} s; browser errors: {errors[-10:]}") from None


def click(driver: webdriver.Chrome, xpath: str) -> None:
    """Click the element at ``xpath`` once it is shown (retried while React replaces it)."""

    def clicked(d: webdriver.Chrome) -> bool:
        for el in d.find_elements(By.XPATH, xpath):
            if el.is_displayed() and el.is_enabled():
                el.click()
                return True
        return False

    wait_for(driver, f"clickable {xpath}", clicked)


def dismiss_banner(driver: webdriver.Chrome) -> None:
    """Hide OHIF's "for investigational use only" banner if it shows (it covers the viewports' bottom)."""
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        with contextlib.suppress(StaleElementReferenceException, WebDriverException):
            button.click()


def canvas_stats(driver: webdriver.Chrome) -> list[dict]:
    return driver.execute_script(CANVAS_STATS_JS)


def rendered(driver: webdriver.Chrome, n: int) -> list[dict] | None:
    """The canvas stats once ``n`` cornerstone canvases show an image (many grey levels, a tenth of pixels lit)."""
    stats = canvas_stats(driver)
    good = [s for s in stats if s["greys"] >= 64 and s["lit"] >= s["width"] * s["height"] // 10]
    return stats if len(stats) >= n and len(good) >= n else None


def body_text(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def server_field(driver: webdriver.Chrome) -> str:
    """The MONAI Label panel's server URL field's value."""
    return driver.find_element(By.ID, "monailabelServerURL").get_attribute("value") or ""


def segmentation_outcome(driver: webdriver.Chrome) -> str | None:
    """The panel's notification after Run: success or failure (None while neither shows)."""
    text = body_text(driver)
    for outcome in ("Running Segmentation - Successful", "Failed to Run Segmentation"):
        if outcome in text:
            return outcome
    return None


def filled_segmentations(driver: webdriver.Chrome) -> list[dict] | None:
    """The viewer's segmentations once the first one's labelmap has segment voxels."""
    segs = driver.execute_script(SEGMENTATIONS_JS)
    return segs if segs and segs[0]["counts"] else None


def coloured_views(driver: webdriver.Chrome) -> list[dict] | None:
    """The canvas stats once two of the three views show segment colours (the hippocampus crosses their slices)."""
    stats = canvas_stats(driver)
    return stats if sum(s["coloured"] > 0 for s in stats) >= 2 else None


def save_shot(driver: webdriver.Chrome, folder: Path, name: str) -> Path:
    path = folder / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    return path


def infer_responses(driver: webdriver.Chrome) -> list[tuple[str, int]]:
    """(url, status) of the browser's responses to /infer/ requests (DevTools network events)."""
    found = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.responseReceived":
            response = message["params"]["response"]
            if "/infer/" in response["url"]:
                found.append((response["url"], int(response["status"])))
    return found


# ---- the tests ----------------------------------------------------------------------------------------------


def test_study_list_shows_the_sample_studies(
    browser: webdriver.Chrome, pacs_server: Server, loaded: list[dict], shots: Path
) -> None:
    patients = sorted(entry["file"].removesuffix(".nii.gz") for entry in loaded)  # load_pacs: PatientID = file stem
    t = time.perf_counter()
    browser.get(f"{pacs_server.url}/ohif/")

    def listed(d: webdriver.Chrome) -> str | None:
        text = body_text(d)
        return text if all(p in text for p in patients) else None

    text = wait_for(browser, "the sample studies in the study list", listed)
    print(f"study list: {time.perf_counter() - t:.1f} s")
    assert re.search(rf"\b{len(patients)}\s+Studies\b", text), text[:500]  # OHIF's count of the studies found
    assert sorted(set(re.findall(r"hippocampus_\d{3}", text))) == patients
    dismiss_banner(browser)
    save_shot(browser, shots, "ohif_study_list.png")


def test_opened_study_renders_its_image(
    browser: webdriver.Chrome, pacs_server: Server, loaded: list[dict], shots: Path
) -> None:
    t = time.perf_counter()
    browser.get(f"{pacs_server.url}/ohif/viewer?StudyInstanceUIDs={loaded[0]['study']}")
    stats = wait_for(browser, "the study's image on a canvas", lambda d: rendered(d, 1))
    print(f"viewer: image rendered in {time.perf_counter() - t:.1f} s: {stats}")
    assert max(s["greys"] for s in stats) >= 64  # an MR slice, not a blank or flat canvas
    dismiss_banner(browser)
    save_shot(browser, shots, "ohif_viewer.png")


def test_monai_label_panel_runs_unet3d_and_the_segmentation_shows(
    browser: webdriver.Chrome, pacs_server: Server, loaded: list[dict], shots: Path
) -> None:
    entry = loaded[0]
    url = f"{pacs_server.url}/"
    # The OHIF v3 MONAI Label panel keeps its server URL in the cookie MONAILABEL_SERVER_URL (path /ohif, as its
    # own CookieUtils writes it), default http://<host>:8000/: point it at this server before the mode loads.
    browser.get(f"{pacs_server.url}/ohif/")
    browser.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": url, "path": "/ohif"})
    t = time.perf_counter()
    browser.get(f"{pacs_server.url}/ohif/monai-label?StudyInstanceUIDs={entry['study']}")
    wait_for(browser, "the three MPR views", lambda d: rendered(d, 3))
    print(f"monai-label mode: 3 views rendered in {time.perf_counter() - t:.1f} s")
    dismiss_banner(browser)
    shown = wait_for(browser, "the panel's server field", server_field)
    assert shown == url, f"the panel shows {shown!r}, not this server {url!r}"

    # connect (the button beside the server field): /info fills the panel and creates an empty labelmap
    click(browser, "//input[@id='monailabelServerURL']/ancestor::tr[1]//button")
    wait_for(browser, "the connected panel", lambda d: d.find_elements(By.XPATH, "//label[.='Auto-Segmentation']"))
    before = wait_for(browser, "the panel's empty labelmap", lambda d: d.execute_script(SEGMENTATIONS_JS))
    assert [s["counts"] for s in before] == [{}], before
    assert sorted(before[0]["names"].values()) == ["anterior", "posterior"], before
    assert all(s["coloured"] == 0 for s in canvas_stats(browser))  # grey MR only
    browser.get_log("performance")  # drop the network events so far

    # run unet3d from the Auto-Segmentation tab
    click(browser, "//label[.='Auto-Segmentation']")
    model = wait_for(
        browser,
        "the segmentation models",
        lambda d: [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, ".selectBox option")],
    )
    assert "unet3d" in model, model
    t = time.perf_counter()
    click(browser, "//button[@title='Run Segmentation']")
    outcome = wait_for(browser, "the panel's answer to Run", segmentation_outcome)
    assert outcome == "Running Segmentation - Successful", outcome
    after = wait_for(browser, "segment voxels in the labelmap", filled_segmentations)
    stats = wait_for(browser, "segment colours in two views", coloured_views)
    print(f"unet3d from the panel: segmentation shown in {time.perf_counter() - t:.1f} s; views {stats}")
    responses = infer_responses(browser)
    assert [status for u, status in responses if f"image={entry['series']}" in u] == [200], responses
    assert "'result_extension': '.nrrd'" in pacs_server.log.read_text()  # the panel's request reached the model
    path = save_shot(browser, shots, "ohif_segmentation.png")

    # the browser's labelmap holds the server's answer: the same voxels per segment as a direct /infer
    r = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"], "output": "image"}, timeout=300
    )
    assert r.status_code == 200, r.text[:300]
    label_file = path.with_name("direct_label.nii.gz")
    label_file.write_bytes(r.content)
    label = np.asanyarray(nib.load(label_file).dataobj)
    labels = requests.get(f"{pacs_server.url}/info/", timeout=30).json()["models"]["unet3d"]["labels"]
    expected = {name: int((label == value).sum()) for name, value in labels.items()}
    seg = after[0]
    shown_counts = {seg["names"][index]: n for index, n in seg["counts"].items()}
    assert shown_counts == expected and min(expected.values()) > 0, (shown_counts, expected)
    assert sorted(seg["dims"]) == sorted(label.shape)

    if os.environ.get("UNET_SEG_SAVE_SCREENSHOTS") == "1":
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(path, docs / "ohif_segmentation.png")
        print(f"copied to {docs / 'ohif_segmentation.png'}")
