"""Data Docs that render with no network: great-expectations' pages load their styles and scripts from CDNs.

Hospital networks are often air-gapped, and the pages were then bare text. great-expectations has no
setting for local assets (its Jinja templates name the CDNs), so medflow ships the same files with the
package and rewrites each page's links to the site's own copy (``static/vendor/``).

The files come from the npm registry, pinned by version and by the registry's sha512 integrity, when
medflow is set up (``make setup`` runs ``python -m components.validation.offline_docs``); they are not
kept in the repository. ``MEDFLOW_NPM_REGISTRY`` names a mirror.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("medflow.validation")

ASSETS_DIR = Path(__file__).with_name("docs_assets")
VENDOR = "static/vendor"  # inside a Data Docs site


@dataclass(frozen=True)
class Package:
    """One npm package: its pinned tarball and the files taken from it (tarball path -> asset path)."""

    name: str
    version: str
    integrity: str  # the registry's dist.integrity: sha512 of the tarball
    files: dict[str, str]

    @property
    def tarball(self) -> str:
        return f"{self.name}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"


PACKAGES = (
    Package("bootstrap", "4.3.1", "sha512-rXqOmH1VilAt2DyPzluTi2blhk17bO7ef+zLLPlWvG494pDxcM234pJ8wTc/6R40UWizAIIMgxjvxZg5kmsbag==",
            {"package/dist/css/bootstrap.min.css": "bootstrap/bootstrap.min.css",
             "package/dist/js/bootstrap.min.js": "bootstrap/bootstrap.min.js"}),
    Package("@forevolve/bootstrap-dark", "1.1.0",
            "sha512-A3ucpEpxPoTVO490lZZCfjPXxv832l7mm1IxX3bXyxvgwnPGXDLyh7dWrphXKO8YBAu3EswbBEu3VSW8NRMW3A==",
            {"package/dist/css/bootstrap-prefers-dark.css": "bootstrap-dark/bootstrap-prefers-dark.css"}),
    Package("bootstrap-table", "1.19.1",
            "sha512-WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==",
            {"package/dist/bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
             "package/dist/bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
             "package/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
                 "bootstrap-table/bootstrap-table-filter-control.min.css",
             "package/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
                 "bootstrap-table/bootstrap-table-filter-control.min.js"}),
    Package("bootstrap-datepicker", "1.9.0",
            "sha512-9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==",
            {"package/dist/css/bootstrap-datepicker.min.css": "bootstrap-datepicker/bootstrap-datepicker.min.css",
             "package/dist/js/bootstrap-datepicker.min.js": "bootstrap-datepicker/bootstrap-datepicker.min.js"}),
    Package("jquery", "3.7.1", "sha512-m4avr8yL8kmFN8psrbFFFmB/If14iN5o9nw/NgnnM+kybDJpRsAynV2BsfpTYrTRysYUdADVD7CkUUizgkpLfg==",
            {"package/dist/jquery.min.js": "jquery/jquery.min.js"}),
    Package("popper.js", "1.12.9", "sha512-s0EEi9xiSCdqz9lV4IiVH5yIZnDX/U1t0tCjB+0jXx9jW8lrR7kOpVupiUg175ogqVoudpDXHF1p6dKATCHMeg==",
            {"package/dist/umd/popper.min.js": "popper/popper.min.js"}),
    Package("@fortawesome/fontawesome-free", "6.6.0",
            "sha512-60G28ke/sXdtS9KZCpZSHHkCbdsOGEhIUGlwq6yhY74UpTiToIh8np7A8yphhM4BWsvNFtIvLpi4co+h9Mr9Ow==",
            {"package/css/all.min.css": "fontawesome/css/all.min.css",  # its fonts at ../webfonts/, as in the package
             **{f"package/webfonts/fa-{face}.woff2": f"fontawesome/webfonts/fa-{face}.woff2"  # the CSS's first choice
                for face in ("brands-400", "regular-400", "solid-900", "v4compatibility")}}),
    Package("vega", "5.33.0", "sha512-jNAGa7TxLojOpMMMrKMXXBos4K6AaLJbCgGDOw1YEkLRjUkh12pcf65J2lMSdEHjcEK47XXjKiOUVZ8L+MniBA==",
            {"package/build/vega.min.js": "vega/vega.min.js"}),
    Package("vega-lite", "5.23.0", "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
            {"package/build/vega-lite.min.js": "vega/vega-lite.min.js"}),
    Package("vega-embed", "6.29.0", "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
            {"package/build/vega-embed.min.js": "vega/vega-embed.min.js"}),
)

# What great-expectations' templates load (pattern of the URL, with its attributes) -> the asset, or an image
# great-expectations itself copies into every site (``static/images/``).
LINKS = {
    r"https://maxcdn\.bootstrapcdn\.com/bootstrap/4\.3\.1/css/bootstrap\.min\.css": f"{VENDOR}/bootstrap/bootstrap.min.css",
    r"https://stackpath\.bootstrapcdn\.com/bootstrap/4\.3\.1/js/bootstrap\.min\.js": f"{VENDOR}/bootstrap/bootstrap.min.js",
    r"https://cdn\.jsdelivr\.net/npm/@forevolve/bootstrap-dark@1\.1\.0/dist/css/bootstrap-prefers-dark\.css":
        f"{VENDOR}/bootstrap-dark/bootstrap-prefers-dark.css",
    r"https://unpkg\.com/bootstrap-table@1\.19\.1/dist/bootstrap-table\.min\.css": f"{VENDOR}/bootstrap-table/bootstrap-table.min.css",
    r"https://unpkg\.com/bootstrap-table@1\.19\.1/dist/bootstrap-table\.min\.js": f"{VENDOR}/bootstrap-table/bootstrap-table.min.js",
    r"https://unpkg\.com/bootstrap-table@1\.19\.[01]/dist/extensions/filter-control/bootstrap-table-filter-control(\.min)?\.css":
        f"{VENDOR}/bootstrap-table/bootstrap-table-filter-control.min.css",
    r"https://unpkg\.com/bootstrap-table@1\.19\.1/dist/extensions/filter-control/bootstrap-table-filter-control\.min\.js":
        f"{VENDOR}/bootstrap-table/bootstrap-table-filter-control.min.js",
    r"https://cdnjs\.cloudflare\.com/ajax/libs/bootstrap-datepicker/1\.9\.0/css/bootstrap-datepicker\.min\.css":
        f"{VENDOR}/bootstrap-datepicker/bootstrap-datepicker.min.css",
    r"https://cdnjs\.cloudflare\.com/ajax/libs/bootstrap-datepicker/1\.9\.0/js/bootstrap-datepicker\.min\.js":
        f"{VENDOR}/bootstrap-datepicker/bootstrap-datepicker.min.js",
    r"https://code\.jquery\.com/jquery-3\.7\.1\.min\.js": f"{VENDOR}/jquery/jquery.min.js",
    r"https://cdnjs\.cloudflare\.com/ajax/libs/popper\.js/1\.12\.9/umd/popper\.min\.js": f"{VENDOR}/popper/popper.min.js",
    r"https://cdnjs\.cloudflare\.com/ajax/libs/font-awesome/6\.6\.0/css/all\.min\.css": f"{VENDOR}/fontawesome/css/all.min.css",
    r"https://cdn\.jsdelivr\.net/npm/vega@5": f"{VENDOR}/vega/vega.min.js",
    r"https://cdn\.jsdelivr\.net/npm/vega-lite@5": f"{VENDOR}/vega/vega-lite.min.js",
    r"https://cdn\.jsdelivr\.net/npm/vega-embed@6": f"{VENDOR}/vega/vega-embed.min.js",
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/(logo-long|full_logo_dark)\.png(\?[^\"')]*)?":
        "static/images/logo-long.png",
}
# a loaded resource (not a plain link a reader may follow): src=, a stylesheet's href=, or url() in a style
LOADED = re.compile(r"""(?:src=["']|<link[^>]*href=["']|url\(["']?)(https?://[^"')\s]+)""", re.IGNORECASE)
SITE_STATIC = re.compile(r"""((?:src|href)=["'])(?:\./|(?:\.\./)+)static/""")
SUBRESOURCE_CHECK = re.compile(r"""\s+(?:integrity="[^"]*"|crossorigin="[^"]*")""")  # hashes of the CDN's bytes


def asset_files() -> list[str]:
    """Every asset path (relative to :data:`ASSETS_DIR` and to a site's ``static/vendor/``)."""
    return [asset for package in PACKAGES for asset in package.files.values()]


def missing_assets(folder: Path = ASSETS_DIR) -> list[str]:
    return [asset for asset in asset_files() if not (folder / asset).is_file()]


def fetch_assets(folder: Path = ASSETS_DIR, registry: str | None = None) -> int:
    """Download the pinned packages from the npm registry, check each tarball's sha512 and keep the files
    Data Docs load. Returns how many packages were fetched (0 when every file was there)."""
    registry = (registry or os.environ.get("MEDFLOW_NPM_REGISTRY") or "https://registry.npmjs.org").rstrip("/")
    fetched = 0
    for package in PACKAGES:
        if all((folder / asset).is_file() for asset in package.files.values()):
            continue
        url = f"{registry}/{package.tarball}"
        with urllib.request.urlopen(url, timeout=120) as answer:
            data = answer.read()
        digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if digest != package.integrity:
            raise RuntimeError(f"{url}: sha512 {digest} is not the pinned {package.integrity}; nothing was kept")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member, asset in package.files.items():
                target = folder / asset
                target.parent.mkdir(parents=True, exist_ok=True)
                extracted = archive.extractfile(member)
                if extracted is None:
                    raise RuntimeError(f"{url}: {member} is not a file in the package")
                partial = target.with_suffix(target.suffix + ".partial")
                partial.write_bytes(extracted.read())
                partial.replace(target)
        fetched += 1
    return fetched


def make_offline(site: Path, assets: Path = ASSETS_DIR) -> list[str]:
    """Copy the assets into ``site/static/vendor/`` and point every page of the Data Docs ``site`` at them.

    Returns the URLs still loaded from the network (none with great-expectations' current templates; a
    new one in a later release is logged, and the page still works online). Without the packaged assets
    (medflow installed without ``make setup``) the pages keep the CDNs, with a warning.
    """
    if missing := missing_assets(assets):
        log.warning("Data Docs need the network for their styles: %d packaged asset(s) are missing (%s); run "
                    "`python -m components.validation.offline_docs` where the npm registry is reachable",
                    len(missing), missing[0])
        return []
    shutil.copytree(assets, site / VENDOR, dirs_exist_ok=True, copy_function=_link_or_copy)
    links = [(re.compile(pattern), target) for pattern, target in LINKS.items()]
    remote: set[str] = set()
    for page in site.rglob("*.html"):
        root = Path(os.path.relpath(site, page.parent)).as_posix()
        html = page.read_text(encoding="utf-8")
        for pattern, target in links:
            html = pattern.sub(f"{root}/{target}", html)
        html = SUBRESOURCE_CHECK.sub("", html)  # a local file is not the CDN's response: no integrity, no CORS
        # great-expectations counts one folder too few on a validation page (its favicon): every page's
        # relative links into static/ start from the site's root
        html = SITE_STATIC.sub(lambda m: f"{m[1]}{root}/static/", html)
        remote.update(LOADED.findall(html))
        page.write_text(html, encoding="utf-8")
    for url in sorted(remote):
        log.warning("Data Docs still load %s from the network (a great-expectations template medflow does not know)",
                    url)
    return sorted(remote)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows (every data version's site shares the same 2.5 MB)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def main() -> int:
    try:
        fetched = fetch_assets()
    except (OSError, RuntimeError) as exc:
        print(f"medflow: error: cannot fetch the Data Docs assets: {exc}", file=sys.stderr)
        return 1
    print(f"Data Docs assets: {len(asset_files())} files in {ASSETS_DIR}" + (f" ({fetched} package(s) fetched)"
                                                                            if fetched else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
