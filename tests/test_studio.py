"""`ddlp studio`: the JSON endpoints, and the page itself in a real headless Chromium (Selenium).

The browser test needs Debian's `chromium` and `chromium-driver` packages and the `selenium`
Python package; it is skipped, saying which is missing, when they are not installed. Its
screenshots go to $DDLP_TEST_ARTIFACTS (if set) or the test's tmp_path.
"""
import base64
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddlp import Config
from ddlp.cli import main
from ddlp.model import build_model
from ddlp.studio import Studio, balls_clips, folder_clips, make_server

HORIZON = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)     # four particles, as the messages and counts below expect
    return build_model(Config.preset("balls_small", n_kp_enc=4, n_kp_prior=10, topk=4)).eval()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The studio on a free port of 127.0.0.1, in a thread: one Balls clip, then a 3-frame clip
    (too short for the 4 burn-in frames) from a clips folder."""
    folder = tmp_path_factory.mktemp("clips")
    np.save(folder / "short.npy", np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not a clip")
    clips = {**balls_clips(1, 8, 64), **folder_clips(folder, 64)}
    srv = make_server(Studio(model, clips, horizon=HORIZON), quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}"
    srv.shutdown()
    srv.server_close()


def call(url: str, body=None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(int)


# ------------------------------------------------------------------------------ endpoints
def test_info_clip_and_local_binding(server):
    assert server.startswith("http://127.0.0.1:")
    status, info = call(server + "/api/info")
    assert status == 200 and info["model"]["particles"] == 4 and info["model"]["type"] == "DDLP"
    assert info["clips"] == ["balls-0", "short.npy"] and info["edit_frames"] == [0, 4]
    status, clip = call(server + "/api/clip", {"clip": "balls-0"})
    assert status == 200 and len(clip["frames"]) == len(clip["recon"]) == 4 and len(clip["glimpses"]) == 4
    pos = np.array(clip["particles"]["position"])
    assert pos.shape == (4, 4, 2) and np.abs(pos).max() < 1.5
    assert png(clip["frames"][0]).shape == (64, 64, 3)
    with urllib.request.urlopen(server + "/") as r:
        page = r.read().decode()
    assert "<canvas id=\"editor\"" in page and "http" not in page.replace("http-equiv", "")  # nothing remote


def test_play_and_preview(server):
    move = {"attribute": "position", "op": "add", "particles": [1], "value": [0.0, 0.15]}
    status, r = call(server + "/api/play", {"clip": "balls-0", "edits": [move], "horizon": HORIZON})
    assert status == 200 and len(r["original"]) == len(r["edited"]) == 4 + HORIZON and r["touched"] == [1]
    assert r["changed_frames"] > 0 and any(o != e for o, e in zip(r["original"], r["edited"]))
    x = np.array(r["edited_particles"]["position"])[:4, 1, 1] - np.array(r["original_particles"]["position"])[:4, 1, 1]
    assert np.allclose(x, 0.15, atol=1e-4)
    status, r = call(server + "/api/play", {"clip": "balls-0", "edits": [], "horizon": 3})
    assert status == 200 and r["original"] == r["edited"] and r["changed_frames"] == 0     # bit for bit
    status, p = call(server + "/api/preview", {"clip": "balls-0", "edits": [move]})
    assert status == 200 and len(p["recon"]) == 4
    assert np.isclose(p["particles"]["position"][0][1][1] - call(server + "/api/clip", {"clip": "balls-0"})[1]
                      ["particles"]["position"][0][1][1], 0.15, atol=1e-4)


@pytest.mark.parametrize("path, body, code, message", [
    ("/api/play", {"clip": "balls-0", "edits": [{"attribute": "position", "op": "add", "particles": [9],
                                                  "value": [0, 0.1]}]}, 400, "particle 9 does not exist"),
    ("/api/preview", {"clip": "balls-0", "edits": [{"attribute": "position", "op": "add", "particles": [0],
                                                     "value": [0, 3]}]}, 400, "outside the image"),
    ("/api/clip", {"clip": "short.npy"}, 400, "has 3 frame(s), fewer than the 4 conditioning"),
    ("/api/clip", {"clip": "nope"}, 400, "unknown clip 'nope'"),
    ("/api/play", {"clip": "balls-0", "horizon": 10000}, 400, "horizon must be between 1 and 500"),
    ("/api/play", {"clip": "balls-0", "edit_frames": [5, 6]}, 400, "must start inside the 4 conditioning"),
    ("/api/play", b"{not json", 400, "not valid JSON"),
    ("/api/nothing", {}, 404, "not found"),
])
def test_bad_requests_get_a_message(server, path, body, code, message):
    status, r = call(server + path, body)
    assert status == code and message in r["error"]


def test_static_files_only_from_the_package(server):
    for path in ("/static/app.js", "/static/style.css"):
        with urllib.request.urlopen(server + path) as r:
            assert r.status == 200 and len(r.read()) > 500
    for path in ("/static/../server.py", "/static/.hidden.js", "/static/server.py"):
        assert call(server + path)[0] == 404


def test_studio_refuses_a_non_ddlp_model_and_bad_folders(tmp_path, capsys):
    with pytest.raises(ValueError, match="needs a DDLP video model"):
        Studio(build_model(Config.preset("balls_small", model="dlp")), {})
    build_model(Config.preset("balls_small", model="dlp")).save_pretrained(tmp_path / "dlp")
    assert main(["studio", str(tmp_path / "dlp")]) == 2
    assert "ddlp studio: error:" in capsys.readouterr().err
    build_model(Config.preset("balls_small")).save_pretrained(tmp_path / "ddlp")
    assert main(["studio", str(tmp_path / "ddlp"), "--clips", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_command_serves_the_page(tmp_path):
    import subprocess
    import sys
    build_model(Config.preset("balls_small")).save_pretrained(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "ddlp.cli", "studio", str(tmp_path / "m"), "--port", "0",
                             "--balls", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line
        url = line.split("open ", 1)[1].split()[0]
        status, info = call(url + "api/info")
        assert status == 200 and info["clips"] == ["balls-0"]
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------------------ the page in Chromium
CHROMIUM = next((p for p in (os.environ.get("DDLP_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = os.environ.get("DDLP_CHROMEDRIVER") or shutil.which("chromedriver")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "no headless Chromium: apt-get install chromium chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {reason}")
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("DDLP_TEST_ARTIFACTS") or tmp_path) / "studio"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for(driver, script: str, timeout: float = 60.0):
    """Poll a JS expression until it is truthy; fail with the page's error text otherwise."""
    end = time.time() + timeout
    while time.time() < end:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.1)
    err = driver.execute_script("return document.getElementById('error-text').textContent")
    raise AssertionError(f"timed out waiting for {script!r}; page error: {err!r}")


IDLE = "document.body.dataset.busy === '0'"


def test_drag_a_particle_and_play_in_chromium(browser, server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    d = browser
    d.get(server + "/")
    wait_for(d, "window.studio.state.clip !== null && " + IDLE)
    assert d.find_element(By.ID, "error").get_attribute("hidden") is not None
    # the particle nearest the centre, its position on the canvas, and the drag
    pos = np.array(d.execute_script("return window.studio.state.clip.particles.position[0]"))
    k = int(np.abs(pos).max(-1).argmin())
    canvas = d.find_element(By.ID, "editor")
    w, h = canvas.size["width"], canvas.size["height"]
    zoom = w / 64
    cy, cx = (((pos[k] + 1) / 2 * 63) + 0.5) * zoom
    step = -10 if pos[k, 1] > 0 else 10                           # towards the centre
    chain = ActionChains(d).move_to_element_with_offset(canvas, int(round(cx - w / 2)), int(round(cy - h / 2)))
    chain.click_and_hold()
    for _ in range(4):
        chain.move_by_offset(step, 0)
    chain.release().perform()
    wait_for(d, f"window.studio.state.selected.has({k}) && window.studio.state.preview !== null && " + IDLE)
    dx = d.execute_script(f"return window.studio.state.per[{k}].dx")
    assert dx == pytest.approx(4 * step / zoom / 63 * 2, abs=0.01)     # 40 px on a 6x canvas = 0.21
    assert "selected: #%d" % k in d.find_element(By.ID, "selection-label").text
    # Play: both rollouts appear; the edited one differs from the original
    d.find_element(By.ID, "play").click()
    wait_for(d, "document.body.dataset.played === '1' && " + IDLE)
    assert d.find_element(By.ID, "players").is_displayed()
    d.find_element(By.ID, "pause").click()
    n = d.execute_script("return window.studio.state.play.original.length")
    assert n == 4 + HORIZON
    d.execute_script("const s = document.getElementById('play-frame'); s.value = s.max;"
                     "s.dispatchEvent(new Event('input'));")
    original = png(d.find_element(By.ID, "play-original").get_attribute("src"))
    edited = png(d.find_element(By.ID, "play-edited").get_attribute("src"))
    assert original.shape == edited.shape == (64, 64, 3)
    assert np.abs(original - edited).max() > 0, "the what-if rollout looks exactly like the original"
    assert f"t = {n - 1} (predicted)" in d.find_element(By.ID, "play-label").text
    assert "differs in" in d.find_element(By.ID, "play-info").text
    d.save_screenshot(str(artifacts / "studio-play.png"))

    # bad input shows a message instead of breaking the page: an edit outside the image ...
    dx_input = d.find_element(By.ID, "dx")
    dx_input.clear()
    dx_input.send_keys("5\n")
    wait_for(d, "!document.getElementById('error').hidden && " + IDLE)
    assert "outside the image" in d.find_element(By.ID, "error-text").text
    # ... and a clip shorter than the burn-in
    d.execute_script("const s = document.getElementById('clip-select'); s.value = 'short.npy';"
                     "s.dispatchEvent(new Event('change'));")
    wait_for(d, "document.getElementById('error-text').textContent.includes('fewer than the 4') && " + IDLE)
    assert d.find_element(By.ID, "error").is_displayed()
    assert not d.find_element(By.ID, "players").is_displayed()          # nothing stale from the last clip
    assert d.find_element(By.ID, "play").get_attribute("disabled") is not None
    d.save_screenshot(str(artifacts / "studio-error.png"))
    # the page still works: back to the Balls clip, the message goes away
    d.execute_script("const s = document.getElementById('clip-select'); s.value = 'balls-0';"
                     "s.dispatchEvent(new Event('change'));")
    wait_for(d, "document.getElementById('error').hidden && window.studio.state.clip !== null && " + IDLE)
    assert Image.open(artifacts / "studio-play.png").size[0] > 800
    # box-select: a rubber band from a corner far from every particle over the whole canvas
    pix = (((pos + 1) / 2 * 63) + 0.5) * zoom                           # [K, 2] (y, x) canvas pixels
    corners = [(4, 4), (4, h - 4), (w - 4, 4), (w - 4, h - 4)]
    x0, y0 = max(corners, key=lambda c: np.hypot(pix[:, 1] - c[0], pix[:, 0] - c[1]).min())
    ActionChains(d).move_to_element_with_offset(canvas, int(x0 - w / 2), int(y0 - h / 2)).click_and_hold() \
        .move_by_offset(int(w / 2 - x0), int(h / 2 - y0)).move_by_offset(int(w / 2 - x0), int(h / 2 - y0)) \
        .release().perform()
    inside = sorted(int(i) for i in np.nonzero((np.abs(pos) <= 1).all(-1))[0])
    assert d.execute_script("return [...window.studio.state.selected].sort()") == inside
    # appearance copy from the controls: every selected particle decodes the glimpse of #inside[0]
    src = inside[0]
    before = d.execute_script("return window.studio.state.clip.glimpses")
    assert any(before[j] != before[src] for j in inside)                 # distinct before the copy
    d.execute_script(f"document.getElementById('feature-source').value = '{src}'")
    d.find_element(By.ID, "copy-features").click()
    wait_for(d, "window.studio.state.featureOps.length === 1")
    wait_for(d, f"(() => {{ const p = window.studio.state.preview;"           # the debounced preview
                f" return p && {inside}.every((j) => p.glimpses[j] === p.glimpses[{src}]); }})()")
    assert f"take the appearance of {src}" in d.find_element(By.ID, "feature-ops").text


def test_folder_clips_offers_episodes_of_array_files(tmp_path):
    import h5py
    eps = np.random.default_rng(1).integers(0, 255, (10, 5, 32, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "eps.hdf5", "w") as f:
        f["imgs"] = eps
    np.save(tmp_path / "one.npy", eps[0])
    clips = folder_clips(tmp_path, 32, episodes_per_file=3)
    assert list(clips) == ["eps.hdf5 #0", "eps.hdf5 #1", "eps.hdf5 #2", "one.npy"]
    assert torch.equal(clips["eps.hdf5 #2"](), torch.from_numpy(eps[2]).permute(0, 3, 1, 2).float() / 255)
