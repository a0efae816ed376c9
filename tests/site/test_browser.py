"""The built site in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) loads every page from a local HTTP server.

- The math renders: every math element holds MathJax output, and there is no error node.
- Every image loads and has a non-zero size.
- The search page finds a chapter by a word of its title.
- A screenshot of the first chapter is saved to ``_build/site-test/``.

No network: the pages ask for MathJax 3 from its CDN, and the server answers with a copy from
the npm registry's ``mathjax@3`` package (``make site-test`` installs it into
``_build/vendor``; ``MATHJAX_DIR`` names another copy). The published site keeps the CDN.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from site_helpers import ARTEFACTS, CHAPTERS, ROOT, SITE, html_pages, require_site

MATHJAX_DIR = Path(os.environ.get("MATHJAX_DIR", ROOT / "_build" / "vendor" / "node_modules" / "mathjax"))
MATHJAX_CDN = re.compile(rb"https://cdn\.jsdelivr\.net/npm/mathjax@3/es5/")
MATHJAX_LOCAL = b"/__mathjax__/es5/"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
PAGE_TIMEOUT = 60  # seconds for a page and its math


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; MathJax's CDN address in a page becomes this server's vendored copy."""

    missing: list[str] = []

    def translate_path(self, path):
        if path.startswith(MATHJAX_LOCAL.decode()):
            rel = path[len("/__mathjax__/") :].split("?")[0].split("#")[0]
            return str(MATHJAX_DIR / rel)
        return super().translate_path(path)

    def send_head(self):
        path = self.translate_path(self.path)
        if path.endswith(".html") and os.path.isfile(path):
            body = MATHJAX_CDN.sub(MATHJAX_LOCAL, Path(path).read_bytes())
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            import io

            return io.BytesIO(body)
        return super().send_head()

    def send_error(self, code, message=None, explain=None):
        if self.path != "/favicon.ico":  # asked for by the browser itself, not by a page
            _Handler.missing.append(f"{code} {self.path}")
        super().send_error(code, message, explain)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server():
    require_site()
    if not (MATHJAX_DIR / "es5" / "tex-mml-chtml.js").is_file():
        pytest.fail(
            f"no MathJax 3 at {MATHJAX_DIR}: `make site-test` installs it "
            "(npm install --prefix _build/vendor mathjax@3), or set MATHJAX_DIR"
        )
    handler = functools.partial(_Handler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (shutil.which(path) or os.path.isfile(path)):
            pytest.fail(f"{path} not found: install Debian's {package} (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    driver.set_script_timeout(PAGE_TIMEOUT)
    yield driver
    driver.quit()


#: Waits for MathJax (when the page loads it) and reports what a reader would see.
INSPECT = """
const done = arguments[arguments.length - 1];
(async () => {
  if (document.querySelector('script[src*="mathjax"]')) {
    for (let i = 0; i < 600 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
      await new Promise(r => setTimeout(r, 50));
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  }
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })));
  const math = Array.from(document.querySelectorAll('.math'));
  const red = Array.from(document.querySelectorAll('mjx-mtext')).filter(
      e => /color:\\s*red/.test(e.getAttribute('style') || '') || e.closest('[style*="color: red"]'));
  done({
    mathjax: !!(window.MathJax && MathJax.version),
    math: math.length,
    unrendered: math.filter(e => !e.querySelector('mjx-container') && e.tagName !== 'MJX-CONTAINER')
                    .map(e => e.textContent.slice(0, 80)),
    merror: Array.from(document.querySelectorAll('mjx-merror')).map(
        e => (e.closest('mjx-container') || e).getAttribute('aria-label') || e.textContent.slice(0, 80)),
    undefined_macros: red.map(e => {
      const mml = e.closest('mjx-container') && e.closest('mjx-container').querySelector('mjx-assistive-mml');
      return (mml ? mml.textContent : e.textContent).slice(0, 80);
    }),
    images: imgs.map(img => ({src: img.getAttribute('src'), w: img.naturalWidth, h: img.naturalHeight,
                              complete: img.complete})),
  });
})();
"""


def _pages() -> list[str]:
    if not (SITE / "index.html").exists():
        return ["<no site: run make book>"]
    return [p.relative_to(SITE).as_posix() for p in html_pages()]


@pytest.mark.parametrize("page", _pages())
def test_page_renders_its_math_and_figures(server, browser, page):
    browser.get(f"{server}/{page}")
    seen = browser.execute_async_script(INSPECT)
    if seen["math"]:
        assert seen["mathjax"], f"{page}: has math but MathJax did not load"
        assert not seen["unrendered"], f"{page}: math without MathJax output: {seen['unrendered'][:5]}"
    assert not seen["merror"], f"{page}: MathJax error(s): {seen['merror'][:5]}"
    assert not seen["undefined_macros"], f"{page}: undefined TeX macro(s): {seen['undefined_macros'][:5]}"
    bad = [i for i in seen["images"] if not i["complete"] or i["w"] == 0 or i["h"] == 0]
    assert not bad, f"{page}: image(s) that did not load: {bad[:5]}"


def test_chapter_pages_have_rendered_math(server, browser):
    """The book's math is on its chapters: each shows MathJax output (not only no errors)."""
    for doc in CHAPTERS:
        browser.get(f"{server}/{doc}.html")
        seen = browser.execute_async_script(INSPECT)
        assert seen["math"] > 0 and seen["mathjax"], f"{doc}: no math rendered by MathJax"


def test_search_finds_a_chapter(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    doc = CHAPTERS[0]
    browser.get(f"{server}/{doc}.html")
    title = browser.execute_script(
        "return (document.querySelector('article h1') || document.querySelector('h1')).textContent"
    )
    words = sorted((w for w in re.findall(r"[A-Za-z]{5,}", title)), key=len, reverse=True)
    assert words, f"{doc}: no word to search for in its title {title!r}"
    term = words[0]
    browser.get(f"{server}/search.html?q={term}")
    WebDriverWait(browser, PAGE_TIMEOUT).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#search-results ul.search li")
            or "did not match" in d.find_element(By.ID, "search-results").text
        )
    )
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")]
    assert any(f"{doc}.html" in (h or "") for h in hrefs), f"searching {term!r} did not find {doc}: {hrefs[:10]}"


def test_screenshot_of_a_chapter(server, browser):
    from PIL import Image

    doc = CHAPTERS[0]
    browser.get(f"{server}/{doc}.html")
    browser.execute_async_script(INSPECT)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / (doc.replace("/", "_") + ".png")
    assert browser.save_screenshot(str(shot)), "Chromium took no screenshot"
    with Image.open(shot) as image:
        lo, hi = image.convert("L").getextrema()
        assert image.width >= 1000 and hi - lo > 100, f"{shot}: a blank screenshot ({image.size}, grey {lo}..{hi})"


def test_nothing_the_pages_asked_for_was_missing(server, browser):
    """Runs last in this file: every file a page requested from the server existed."""
    assert not _Handler.missing, (
        f"the pages requested files the site does not have: {sorted(set(_Handler.missing))[:20]}"
    )
