"""The built documentation site and a ``pyrobnn report`` page, opened in headless Chromium.

Every HTML page of ``docs/_build/html`` (``make docs`` builds it) and the ``index.html`` of a report
made here are loaded; each must have non-empty main content, every ``<img>`` must have loaded
(``naturalWidth > 0``), and the browser console must show no error. Run by ``make docs-check``
(marker ``browser``, outside the default run). Skips with the reason when Chromium, its driver,
selenium or the built site is missing; CI installs all of them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
# root, no network: no sandbox, no GPU, nothing that phones home
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")

# What a page reports back: its main text length, its broken images.
_INSPECT = """
const main = document.querySelector('[role=main], main, article, .body') || document.body;
const broken = Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.getAttribute('src'));
return {text: (main.innerText || '').trim().length, images: document.images.length, broken: broken};
"""


def _binary(*names):
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[docs]')")
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="pyrobnn-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


class serve:
    """Serve ``directory`` over HTTP on localhost, as a site is read (the search page fetches files,
    which a browser refuses for file:// pages). ``with serve(d) as base: ...`` gives the base URL."""

    def __init__(self, directory):
        self.directory = str(directory)

    def __enter__(self):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/favicon.ico":  # asked by the browser itself, not by a page
                    self.send_response(204)
                    self.end_headers()
                    return
                super().do_GET()

        handler = functools.partial(Quiet, directory=self.directory)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def check_page(driver, url: str):
    """Load ``url``; return a list of problems (empty when the page is fine)."""
    import time

    driver.get_log("browser")  # drop what earlier pages left
    driver.get(url)
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")  # lazy images load too
    deadline = time.monotonic() + 10  # content a script fills in (search results) may take a moment
    state = driver.execute_script(_INSPECT)
    while state["text"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        state = driver.execute_script(_INSPECT)
    problems = []
    if state["text"] == 0:
        problems.append("empty main content")
    if state["broken"]:
        problems.append(f"images not loaded: {state['broken']}")
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    if errors:
        problems.append(f"console errors: {errors}")
    return problems


def site_pages():
    return sorted(p for p in SITE.rglob("*.html") if "_sources" not in p.parts and "_modules" not in p.parts)


def test_every_site_page_renders(browser):
    if not (SITE / "index.html").is_file():
        pytest.skip("the site is not built: run `make docs` first")
    pages = site_pages()
    assert len(pages) > 20, f"only {len(pages)} pages under {SITE}"
    failures = {}
    with serve(SITE) as base:
        for page in pages:
            rel = page.relative_to(SITE).as_posix()
            # the search page is empty until it is asked something: ask, and its results must render
            problems = check_page(browser, base + rel + ("?q=prior" if rel == "search.html" else ""))
            if problems:
                failures[rel] = problems
    assert not failures, failures


def test_checker_sees_broken_image_and_console_error(browser, tmp_path):
    """The checks can fail: a missing image and a script error are both reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><main><p>text</p><img src='missing.png'>"
                   "<script>undefined_function()</script></main></body></html>")
    _good_page(tmp_path)
    with serve(tmp_path) as base:
        problems = check_page(browser, base + "bad.html")
        assert any("missing.png" in p for p in problems), problems
        assert any("console errors" in p for p in problems), problems
        assert check_page(browser, base + "good.html") == []


def _good_page(tmp_path):
    import base64
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    (tmp_path / "dot.png").write_bytes(png)
    good = tmp_path / "good.html"
    good.write_text("<html><body><main><p>text</p><img src='dot.png'></main></body></html>")
    return good


def test_report_page_renders(browser, tmp_path):
    import torch

    import pyrobnn
    from pyrobnn.cli import main
    from pyrobnn.inference import sample
    from pyrobnn.models import build

    torch.manual_seed(0)
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    bnn = pyrobnn.bayesian(build("mlp", in_features=4, out_features=2, hidden=[8]))
    post = sample(bnn, (x, y), num_chains=2, num_samples=6, warmup_steps=10, thin=2, seed=0, eval_x=x[:10])
    from pyrobnn.arviz_compat import write

    write(pyrobnn.to_inference_data(post, data=(x, y)), tmp_path / "inference_data.nc")
    assert main(["report", str(tmp_path)]) == 0
    page = tmp_path / "report" / "index.html"
    assert page.is_file()
    assert "<img" in page.read_text()
    with serve(page.parent) as base:
        assert check_page(browser, base + "index.html") == []
