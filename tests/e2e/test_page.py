"""The page at ``/`` in a real browser: Debian's chromium, headless, driven by Playwright against the real server.

Digits are drawn with pointer moves along the skeletons of real MNIST test digits; what the page shows
is checked against what the API answers for the same pixels. Screenshots go to the test's tmp folder
and, with ``DIGITSERVE_SCREENSHOTS=docs``, to ``docs/page-desktop.png`` and ``docs/page-phone.png``.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from harness.server import Server, encode, running
from service.model import store

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
API_KEY = "page-test-key-5f2c"
SERVER_ARGS = ("--accelerator", "cpu", "--api-servers", "1")  # one HTTP process: the page needs no more
CELL = 10  # canvas pixels per MNIST pixel: the 280 px pad holds a 28x28 digit at the scale MNIST drew it

if not Path(CHROMIUM).exists():  # make test installs it (.ci/system-deps.sh): missing is a failure, not a skip
    raise RuntimeError(f"{CHROMIUM} is missing: run `make system-deps` (.ci/system-deps.sh installs Debian's chromium)")

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------- strokes from MNIST digits

NEIGHBOURS = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]  # P2..P9, clockwise from north


def thin(ink: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: the one-pixel-wide skeleton of a binary image."""
    img = np.pad(ink.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p = [np.roll(img, (-dr, -dc), (0, 1)) for dr, dc in NEIGHBOURS]
            count = sum(p)
            transitions = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(int) for i in range(8))
            p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
            first = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            second = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            kill = (img == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & (first if step == 0 else second)
            if kill.any():
                img[kill] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def strokes(skeleton: np.ndarray) -> list[list[tuple[int, int]]]:
    """The skeleton as pen strokes (lists of (row, col)): each starts at a free end where there is one and
    walks to unvisited neighbours; a stroke that starts or ends beside drawn ink joins it."""
    todo = {(int(r), int(c)) for r, c in np.argwhere(skeleton)}
    done: set[tuple[int, int]] = set()

    def around(p: tuple[int, int], pool: set[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(p[0] + dr, p[1] + dc) for dr, dc in NEIGHBOURS if (p[0] + dr, p[1] + dc) in pool]

    out = []
    while todo:
        ends = [p for p in todo if len(around(p, todo)) <= 1]
        p = min(ends or todo)
        path = around(p, done)[:1]
        while True:
            path.append(p)
            todo.discard(p)
            done.add(p)
            ahead = around(p, todo)
            if not ahead:
                path += [q for q in around(p, done) if q not in path[-3:]][:1]
                break
            p = min(ahead, key=lambda q: (abs(q[0] - p[0]) + abs(q[1] - p[1]), len(around(q, todo))))
        if len(path) >= 2:
            out.append(path)
    return out


def digit_strokes(image: np.ndarray) -> list[list[tuple[int, int]]]:
    return strokes(thin(image > 100))


# ---------------------------------------------------------------------------------- browser helpers

PAD_GEOMETRY = """() => { const c = document.getElementById('pad'); const r = c.getBoundingClientRect();
    return [r.left + c.clientLeft, r.top + c.clientTop, c.clientWidth / c.width]; }"""
DATA_TRANSFER = """(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer(); dt.items.add(new File([bytes], 'two.png', {type: 'image/png'})); return dt; }"""
# Chromium does not report multipart bodies built from a Blob, so a shim (added by the test, outside the
# page's policy) records the file and fields of each FormData the page sends.
RECORD_UPLOADS = """(() => { const send = window.fetch; window.__sent = [];
  window.fetch = async function (input, init) {
    const body = init && init.body;
    if (body instanceof FormData && body.get('file')) {
      const bytes = new Uint8Array(await body.get('file').arrayBuffer());
      let text = ''; for (const b of bytes) text += String.fromCharCode(b);
      const fields = Object.fromEntries([...body.entries()].filter(([k]) => k !== 'file'));
      window.__sent.push({url: String(input), file: btoa(text), fields});
    }
    return send.call(this, input, init);
  };
})();"""
CANVAS_PNG = "(id) => document.getElementById(id).toDataURL('image/png')"


class Tab:
    """One browser context and page; every request URL and every console error is recorded."""

    def __init__(self, browser: Browser, server: Server, **context_args):
        self.server = server
        self.context = browser.new_context(**context_args)
        self.context.add_init_script(RECORD_UPLOADS)
        self.page: Page = self.context.new_page()
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self):
        response = self.page.goto(self.server.url + "/")
        assert response is not None and response.status == 200
        expect(self.page.locator("#version")).not_to_have_text("–")
        return response

    def draw(self, digit_strokes: list[list[tuple[int, int]]], pause_ms: float = 0) -> None:
        left, top, scale = self.page.evaluate(PAD_GEOMETRY)
        mouse = self.page.mouse
        for stroke in digit_strokes:
            points = [(left + (c + 0.5) * CELL * scale, top + (r + 0.5) * CELL * scale) for r, c in stroke]
            mouse.move(*points[0])
            mouse.down()
            for point in points[1:]:
                mouse.move(*point)
                if pause_ms:
                    self.page.wait_for_timeout(pause_ms)
            mouse.up()
        self.settled()

    def settled(self) -> None:
        self.page.wait_for_selector("#result[aria-busy=false]", timeout=45_000)

    def canvas_png(self, element_id: str) -> bytes:
        return base64.b64decode(self.page.evaluate(CANVAS_PNG, element_id).split(",", 1)[1])

    def sent(self, path: str) -> list[dict]:
        """What the page sent to ``path`` (pinned or not): the file's bytes and the other form fields."""
        sent = [s for s in self.page.evaluate("window.__sent") if s["url"].split("?")[0] == path]
        return [{**s, "file": base64.b64decode(s["file"])} for s in sent]

    def predict_requests(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.url.split("?")[0].endswith("/predict")]

    def close(self) -> None:
        self.context.close()


@contextmanager
def tab(browser: Browser, server: Server, **context_args) -> Iterator[Tab]:
    t = Tab(browser, server, **context_args)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("page-server"), *SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def mnist_png(mnist_test, tmp_path_factory) -> dict[int, Path]:
    """The first MNIST test image of each digit, as a 28x28 PNG file."""
    images, labels = mnist_test
    folder = tmp_path_factory.mktemp("mnist-png")
    out = {}
    for digit in range(10):
        index = int(np.flatnonzero(labels.numpy() == digit)[0])
        out[digit] = folder / f"mnist-test-{index}-{digit}.png"
        out[digit].write_bytes(encode(images[index].numpy()))
    return out


def api_predict(server: Server, png: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    with server.client() as client:
        response = client.post("/predict", files={"file": ("pad.png", png, "image/png")}, headers=headers)
    return response.status_code, response.json()


def api_explain(server: Server, png: bytes, method: str) -> dict:
    with server.client() as client:
        response = client.post("/explain", files={"file": ("d.png", png, "image/png")},
                               data={"method": method, "top_k": "5"})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def for_people(detail: str) -> str:
    """The API's detail as the page's banner shows it: a person drew one picture, so no "instance 0: "."""
    shown = detail.removeprefix("instance 0: ")
    return shown[0].upper() + shown[1:]


# ---------------------------------------------------------------------------------- the tests


def test_page_and_assets_are_served_with_a_strict_policy(server):
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
        assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"]
        assert csp["style-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
        assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-cache"
        assert client.get("/", headers={"if-none-match": page.headers["etag"]}).status_code == 304

        assets = re.findall(r'(?:src|href)="(/page/[^"]+)"', page.text)
        assert {a.split("?")[0] for a in assets} == {"/page/app.js", "/page/style.css", "/page/favicon.svg"}
        assert not re.search(r"<script>|<style|style=|https?://", page.text), "no inline code, nothing elsewhere"
        for path in assets:
            asset = client.get(path)
            assert asset.status_code == 200 and "content-security-policy" in asset.headers
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"  # named by its digest
            assert asset.headers["x-content-type-options"] == "nosniff"
        stale = client.get("/page/app.js?v=0")
        assert stale.status_code == 200 and stale.headers["cache-control"] == "no-cache"
        assert stale.headers["content-type"].startswith("text/javascript")

        for path in ("/page/index.html", "/page/page.py", "/page/..%2Fpage.py", "/page/%2e%2e%2f__init__.py",
                     "/page/../app.py", "/page/", "/page/APP.JS", "/page/app.js%00"):
            refused = client.get(path)
            assert refused.status_code == 404 and "detail" in refused.json(), path


def test_page_loads_clean_without_leaving_the_host(browser, server, mnist_test):
    with server.client() as client:
        info = client.get("/info").json()
    with tab(browser, server) as t:
        response = t.open()
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page = t.page
        assert page.text_content("#version") == str(info["model"]["version"])
        assert page.text_content("#model-name") == info["model"]["name"]
        assert page.text_content("#accuracy") == f"{100 * info['model']['test_accuracy']:.2f}%"
        loaded = (info.get("versions") or {}).get("loaded") or []
        assert page.is_visible("#pin-row") == (len(loaded) > 1)
        assert page.text_content("#label") == "–" and page.is_hidden("#error")

        # the glance panel: inference traffic from elsewhere shows up as a rate and latencies
        with server.client() as client:
            for _ in range(5):
                assert client.get("/metrics").status_code == 200  # not inference: not counted
            pixels = [{"pixels": image.tolist()} for image in mnist_test[0][:3].numpy()]
            for _ in range(4):
                assert client.post("/predict", json={"instances": pixels}).status_code == 200
        expect(page.locator("#m-rate")).to_have_text(re.compile(r"^(?!0\.0/)[\d.]+/s$"), timeout=15_000)
        assert re.fullmatch(r"[\d.]+ ms", page.text_content("#m-p50") or "")
        assert re.fullmatch(r"[\d.]+ ms", page.text_content("#m-p99") or "")
        assert re.fullmatch(r"\d+\.\d", page.text_content("#m-batch") or "")
        assert page.text_content("#m-errors") == "0.0%"

        assert t.errors == [], t.errors
        urls = [r.url for r in t.requests]
        assert any(u.endswith("/info") for u in urls) and any(u.endswith("/metrics") for u in urls)
        strays = [u for u in urls if not u.startswith(server.url + "/")]
        assert strays == [], f"requests left {server.url}: {strays}"

        # the policy is enforced, not only sent: an injected inline script does not run
        ran = page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'window.__inline = 1'; document.body.append(s); return window.__inline === 1; }""")
        assert ran is False


def test_drawn_digits_are_classified_as_the_api_classifies_the_canvas(browser, server, mnist_test):
    images, labels = mnist_test
    shown, drawn = [], []
    with tab(browser, server) as t:
        t.open()
        for digit in range(10):
            index = int(np.flatnonzero(labels.numpy() == digit)[0])
            t.page.click("#clear")
            assert t.page.text_content("#label") == "–"
            before = len(t.predict_requests())
            started = time.monotonic()
            # the zero slowly, in one stroke: the page predicts while the pen is still down
            t.draw(digit_strokes(images[index].numpy()), pause_ms=12 if digit == 0 else 0)
            if digit == 0:
                sent = t.predict_requests()[before:]
                assert len(sent) >= 3, "predictions while drawing and on release"
                assert len(sent) <= (time.monotonic() - started) / 0.25 + 3, "throttled, not one per move"
            png = t.canvas_png("pad")
            status, answer = api_predict(server, png)
            assert status == 200, answer
            label = t.page.text_content("#label")
            assert t.sent("/predict")[-1]["file"] == png, "the last prediction was for the pad as it is now"
            assert label == str(answer["predictions"][0]["label"]), f"digit {digit}"
            confidence = answer["predictions"][0]["confidence"]
            assert t.page.text_content("#confidence") == f"{100 * confidence:.1f}%"
            assert t.page.locator("#probabilities li").count() == 10
            shown.append(int(label))
            drawn.append(digit)
        assert t.errors == [], t.errors
    hits = sum(s == d for s, d in zip(shown, drawn))
    assert hits >= 8, f"drew {drawn}, the page said {shown}"


def _heatmap_pixel(png: bytes, row: int, col: int) -> tuple[int, int, int]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = image.width / 28
    return image.getpixel((int((col + 0.5) * scale), int((row + 0.5) * scale)))


def _check_heatmap(png: bytes, attributions: list[list[float]]) -> None:
    """The heatmap shows the API's attributions: red where they are largest, blue where most negative."""
    a = np.asarray(attributions)
    assert (np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).max(2) > 150).sum() > 100, "the heatmap is drawn"
    r, g, b = _heatmap_pixel(png, *np.unravel_index(a.argmax(), a.shape))
    assert r > 150 and r > 2 * b, (r, g, b)
    if a.min() < -0.3 * a.max():
        r, g, b = _heatmap_pixel(png, *np.unravel_index(a.argmin(), a.shape))
        assert b > 2 * r, (r, g, b)


def test_upload_explains_and_the_method_switch_redraws(browser, server, mnist_png):
    with server.client() as client:
        info = client.get("/info").json()
    seven = mnist_png[7].read_bytes()
    with tab(browser, server) as t:
        t.open()
        page = t.page
        page.set_input_files("#file", str(mnist_png[7]))
        t.settled()
        page.wait_for_selector("#heatmap[data-method=integrated_gradients]", timeout=45_000)
        page.wait_for_selector("#why[aria-busy=false]")
        assert page.text_content("#label") == "7"
        assert page.text_content("#version") == str(info["model"]["version"])
        assert page.get_attribute("#result", "data-version") == str(info["model"]["version"])
        assert t.sent("/predict")[-1]["file"] == seven, "the uploaded file itself is sent"

        explained = api_explain(server, seven, "integrated_gradients")
        ig = t.canvas_png("heatmap")
        _check_heatmap(ig, explained["attributions"])
        relu = next(layer for layer in explained["layers"] if layer.get("top_units"))
        units = page.locator("#units li")
        assert units.count() == 5
        assert units.first.get_attribute("data-unit") == str(relu["top_units"][0]["unit"])
        seen = np.asarray(Image.open(io.BytesIO(t.canvas_png("seen"))).convert("L").resize((28, 28), Image.NEAREST))
        assert np.abs(seen / 255 - np.asarray(explained["input"])).max() < 0.02, "the input the model saw"

        page.check("input[name=method][value=saliency]")
        page.wait_for_selector("#heatmap[data-method=saliency]", timeout=45_000)
        page.wait_for_selector("#why[aria-busy=false]")
        saliency = t.canvas_png("heatmap")
        assert saliency != ig
        _check_heatmap(saliency, api_explain(server, seven, "saliency")["attributions"])
        assert t.sent("/explain")[-1]["fields"] == {"method": "saliency", "top_k": "5"}

        # a picture dropped on the pad
        two = base64.b64encode(mnist_png[2].read_bytes()).decode()
        transfer = page.evaluate_handle(DATA_TRANSFER, two)
        page.dispatch_event("#pad", "drop", {"dataTransfer": transfer})
        expect(page.locator("#label")).to_have_text("2", timeout=45_000)
        t.settled()
        assert page.is_hidden("#error") and t.errors == [], t.errors


def test_blank_canvas_says_no_digit_was_found_and_the_page_recovers(browser, server, mnist_test):
    """A blank canvas is an answer (no_digit), not an error: the page says so, without an error banner."""
    images, labels = mnist_test
    with tab(browser, server) as t:
        t.open()
        page = t.page
        page.click("#clear")
        page.click("#predict")
        page.wait_for_selector("#verdict:not([hidden])", timeout=45_000)
        status, answer = api_predict(server, t.canvas_png("pad"))
        assert status == 200 and answer["predictions"][0]["flags"] == ["no_digit"]
        assert page.text_content("#verdict") == "No digit found in this picture."
        assert page.get_attribute("#verdict", "data-flag") == "no_digit"
        assert page.is_hidden("#error") and "instance 0" not in page.text_content("body")
        assert page.text_content("#label") == "–" and page.text_content("#typicality") == ""
        # draw a digit and the verdict is gone
        t.draw(digit_strokes(images[int(np.flatnonzero(labels.numpy() == 4)[0])].numpy()))
        expect(page.locator("#verdict")).to_be_hidden(timeout=45_000)
        assert page.is_hidden("#error") and page.text_content("#label") != "–"


ADMIN = {"X-Admin-Key": "page-admin-key-" + os.urandom(6).hex()}


@pytest.fixture(scope="module")
def versioned_server(tmp_path_factory: pytest.TempPathFactory, default_model) -> Iterator[Server]:
    """A store of two versions, both loaded through the admin API, version 1 served: the committed one,
    and its weights with class 3's output bias raised so far that version 2 answers 3 to everything."""
    root = tmp_path_factory.mktemp("page-store")
    shutil.copytree(default_model.path, root / store.DEFAULT_NAME / "1")
    state = {k: v.clone() for k, v in default_model.model.state_dict().items()}
    state["fc2.bias"][3] += 100.0
    metadata = {k: v for k, v in default_model.metadata.model_dump().items() if k not in ("name", "version", "sha256")}
    store.write_version(root, store.DEFAULT_NAME, state, metadata)
    with running(tmp_path_factory.mktemp("page-versions"), *SERVER_ARGS, "--store", str(root),
                 env={"DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}) as s:
        with s.client() as client:
            for path, body in (("/admin/versions/1/load", None), ("/admin/versions/2/load", None),
                               ("/admin/serve", {"version": 1})):
                response = client.post(path, headers=ADMIN, json=body)
                assert response.status_code == 200, response.text
        yield s


def test_empty_page_says_what_to_do_and_every_panel_fits_a_1280x900_screen(browser, server):
    """Before any digit: words, not an empty bar chart, a dash and two black squares; then the answer
    replaces them. The metrics panel is on screen at 1280x900 before and after."""
    viewport = {"width": 1280, "height": 900}
    with tab(browser, server, viewport=viewport) as t:
        t.open()
        page = t.page

        def glance_on_screen() -> None:
            box = page.locator("#glance").bounding_box()
            assert box is not None and box["y"] + box["height"] <= viewport["height"], box

        assert "Draw a digit" in (page.text_content("#result-empty") or "") and page.is_visible("#result-empty")
        assert "drop a picture" in (page.text_content("#result-empty") or "")
        for hidden in ("#label", "#probabilities", "#seen", "#heatmap", "#units"):
            assert page.is_hidden(hidden), f"{hidden} shown before any digit"
        assert page.is_visible("#why-empty") and page.is_hidden("#error")
        glance_on_screen()

        page.set_input_files("#file", str(ROOT / "examples" / "seven.png"))
        t.settled()
        page.wait_for_selector("#heatmap[data-method]", timeout=45_000)
        page.wait_for_selector("#why[aria-busy=false]")
        expect(page.locator("#label")).to_have_text("7")
        for shown in ("#label", "#probabilities", "#seen", "#heatmap"):
            assert page.is_visible(shown), shown
        assert page.is_hidden("#result-empty") and page.is_hidden("#why-empty")
        glance_on_screen()

        page.click("#clear")
        assert page.is_visible("#result-empty") and page.is_hidden("#heatmap")
        assert t.errors == [], t.errors


def test_version_picker_pins_predict_and_explain(browser, versioned_server, mnist_png):
    """Two versions loaded: the picker lists them, starts unpinned (the served one answers), and pinning
    one makes both calls ?version=N, answered by that version (the answer's model says so, and the
    label is that version's: 3 from version 2)."""
    server = versioned_server
    with tab(browser, server) as t:
        t.open()
        page = t.page
        expect(page.locator("#pin-row")).to_be_visible()
        assert page.input_value("#pin") == ""
        assert page.eval_on_selector_all("#pin option", "os => os.map(o => o.value)") == ["", "1", "2"]
        page.set_input_files("#file", str(mnist_png[7]))
        t.settled()
        page.wait_for_selector("#heatmap[data-method]", timeout=45_000)
        assert all("?" not in s["url"] for s in t.sent("/predict") + t.sent("/explain")), "unpinned by default"
        assert page.get_attribute("#result", "data-version") == "1"
        for version in ("2", "1"):
            page.select_option("#pin", version)
            t.settled()
            page.wait_for_selector("#why[aria-busy=false]", timeout=45_000)
            expect(page.locator("#result")).to_have_attribute("data-version", version)
            assert t.sent("/predict")[-1]["url"].endswith(f"/predict?version={version}")
            assert t.sent("/explain")[-1]["url"].endswith(f"/explain?version={version}")
            expect(page.locator("#label")).to_have_text({"1": "7", "2": "3"}[version])
    with server.client() as client:  # one loaded version: no picker
        assert client.post("/admin/versions/2/unload", headers=ADMIN).status_code == 200
    with tab(browser, server) as t:
        t.open()
        assert t.page.is_hidden("#pin-row")


def test_controls_are_reachable_by_keyboard(browser, server):
    with tab(browser, server) as t:
        t.open()
        reached = []
        for _ in range(16):
            t.page.keyboard.press("Tab")
            reached.append(t.page.evaluate("document.activeElement.id || document.activeElement.value || ''"))
        assert {"clear", "predict", "file", "integrated_gradients"} <= set(reached), reached
        assert t.page.get_attribute("#prediction", "aria-live") == "polite"
        for control in ("api-key", "file", "pin"):
            assert t.page.locator(f"label[for={control}]").count() == 1, control


def test_screenshots_desktop_and_phone(browser, server, mnist_test, tmp_path):
    images, labels = mnist_test
    three = digit_strokes(images[int(np.flatnonzero(labels.numpy() == 3)[0])].numpy())
    shots = {}
    for name, viewport, scale in (("desktop", {"width": 1280, "height": 900}, 1),
                                  ("phone", {"width": 390, "height": 844}, 2)):
        with tab(browser, server, viewport=viewport, device_scale_factor=scale) as t:
            t.open()
            page = t.page
            t.draw(three)
            page.wait_for_selector("#heatmap[data-method]", timeout=45_000)
            page.wait_for_selector("#why[aria-busy=false]")
            expect(page.locator("#m-p50")).to_have_text(re.compile(r"ms$"), timeout=15_000)
            if name == "desktop":  # a few points on the sparklines
                expect(page.locator("#glance")).to_have_attribute("data-samples", re.compile(r"^([3-9]|\d\d+)$"),
                                                                 timeout=45_000)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name}: the page scrolls sideways ({width} px)"
            pad = page.locator("#pad").bounding_box()
            assert pad is not None and pad["x"] >= 0 and pad["x"] + pad["width"] <= viewport["width"]
            shots[name] = tmp_path / f"page-{name}.png"
            page.screenshot(path=str(shots[name]), full_page=name == "desktop")
            assert t.errors == [], t.errors
    for name, path in shots.items():
        assert Image.open(path).size[0] == {"desktop": 1280, "phone": 780}[name]
        if os.environ.get("DIGITSERVE_SCREENSHOTS") == "docs":  # refresh the committed ones on purpose only
            shutil.copyfile(path, ROOT / "docs" / f"page-{name}.png")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("page-keyed"), *SERVER_ARGS,
                 env={"DIGITSERVE_API_KEY": API_KEY}) as s:
        yield s


def test_api_key_is_asked_for_sent_and_not_stored(browser, keyed_server, mnist_png):
    status, refused = api_predict(keyed_server, mnist_png[7].read_bytes())
    assert status == 401
    with tab(browser, keyed_server) as t:
        t.open()
        page = t.page
        page.set_input_files("#file", str(mnist_png[7]))
        page.wait_for_selector("#error:not([hidden])", timeout=45_000)
        assert page.text_content("#error") == for_people(refused["detail"])
        assert page.is_visible("#key-form") and page.evaluate("document.activeElement.id") == "api-key"
        assert page.text_content("#label") == "–"

        page.fill("#api-key", "not-the-key")
        page.click("#key-use")
        t.settled()
        assert page.text_content("#error") == for_people(refused["detail"])

        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        expect(page.locator("#label")).to_have_text("7", timeout=45_000)
        page.wait_for_selector("#heatmap[data-method]", timeout=45_000)
        assert page.is_hidden("#error")
        sent = [r for r in t.requests if r.method == "POST"]
        assert sent[-1].headers.get("x-api-key") == API_KEY
        assert all(r.headers.get("x-api-key") in (None, API_KEY, "not-the-key") for r in t.requests)
        stored = page.evaluate("""() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage),
                                                        document.cookie])""")
        assert API_KEY not in stored and t.context.cookies() == []
        # the key lives in the tab: a new tab asks again
    with tab(browser, keyed_server) as t:
        t.open()
        t.page.set_input_files("#file", str(mnist_png[7]))
        t.page.wait_for_selector("#error:not([hidden])", timeout=45_000)
        assert t.page.text_content("#error") == for_people(refused["detail"])
