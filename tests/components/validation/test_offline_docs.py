"""Data Docs render with no network: the assets ship with medflow, every page points at the site's copy."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest

from components.validation.expectations import validate_manifest
from components.validation.offline_docs import LOADED, make_offline, missing_assets

ATTRIBUTES = ("sex", "age_group", "race", "site")
REFERENCE = re.compile(r"""(?:src|href)=["']([^"'#]+)["']|url\(["']?([^"')]+)["']?\)""")


@pytest.fixture(scope="module")
def site(small_dataset, tmp_path_factory) -> Path:
    manifest = pd.read_parquet(small_dataset)
    manifest.loc[3, "label"] = 4  # a failed expectation, so the pages show their tables of unexpected values
    docs = tmp_path_factory.mktemp("docs") / "data_docs"
    report = validate_manifest(manifest, num_classes=2, attributes=ATTRIBUTES, previous=manifest, docs_dir=docs)
    assert report.data_docs == docs / "index.html"
    return docs


def test_setup_fetched_every_pinned_asset():
    assert missing_assets() == []  # `make setup` fetched them from the npm registry, sha512-checked


def test_every_page_loads_only_files_of_its_own_site(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 5  # the index, the suites and their validation results
    for page in pages:
        html = page.read_text()
        assert LOADED.findall(html) == [], page  # no stylesheet, script, image or font from the network
        assert "integrity=" not in html  # hashes of the CDN's bytes would block the local copies
        for found in REFERENCE.findall(html):
            link = next(x for x in found if x)
            if urlsplit(link).scheme or link.startswith(("mailto:", "javascript:", "data:")):
                continue  # a plain link a reader may follow (greatexpectations.io), not loaded
            assert (page.parent / unquote(urlsplit(link).path)).resolve().exists(), f"{page.name}: {link}"


def test_without_the_packaged_assets_the_pages_keep_the_cdns_and_say_so(site, tmp_path, caplog):
    original = tmp_path / "site"
    shutil.copytree(site, original)
    assert make_offline(original, assets=tmp_path / "nothing") == []
    assert "run `python -m components.validation.offline_docs`" in caplog.text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it as root)")
def test_a_browser_with_no_network_renders_the_pages_styled_and_scripted(site):
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    network, failed = [], []
    page_paths = [site / "index.html", next((site / "validations").rglob("*.html"))]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.route(re.compile(r"^https?://"), lambda route: (network.append(route.request.url), route.abort()))
        page.on("requestfailed", lambda request: failed.append(request.url))
        for path in page_paths:
            page.goto(path.as_uri(), wait_until="load")
            page.evaluate("document.fonts.ready")
            rendered = page.evaluate("""() => ({
                jquery: typeof window.jQuery === 'function',
                table: !!(window.jQuery && window.jQuery.fn.bootstrapTable),
                popper: typeof window.Popper === 'function',
                vega: typeof window.vegaEmbed === 'function',
                navbar: getComputedStyle(document.querySelector('nav.navbar')).display,
                icons: document.fonts.check('900 16px "Font Awesome 6 Free"'),
            })""")
            assert rendered == {"jquery": True, "table": True, "popper": True, "vega": True, "navbar": "flex",
                                "icons": True}, (path, rendered)
        browser.close()
    assert network == [] and failed == []
