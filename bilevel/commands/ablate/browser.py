"""Renders an HTML report in a real headless Chromium and reads back what the page itself measured (every image
decoded, how many tables), plus a screenshot: the check that the self-contained page works for a reader."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bilevel.core.errors import BilevelError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet, offline, no sandbox (CI runs as root); no background connections on a closed network.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


@dataclass
class BrowserCheck:
    images_ok: bool
    image_count: int
    table_count: int
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return self.images_ok and self.image_count > 0 and self.table_count > 0


def find_browser() -> str | None:
    """$BILEVEL_CHROMIUM, else the first Chromium/Chrome on PATH."""
    explicit = os.environ.get("BILEVEL_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def check_html(page: Path, screenshot: Path | None = None, timeout: float = 120.0) -> BrowserCheck:
    """Load `page` headless; return what its check script recorded on <body> and optionally a PNG screenshot."""
    browser = find_browser()
    if browser is None:
        raise BilevelError(
            "no headless browser found: install chromium (Debian: apt-get install chromium) or set BILEVEL_CHROMIUM"
        )
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="bilevel-browser-") as profile:
        base = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
        dom = _run([*base, "--dump-dom", url], timeout).stdout
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            _run([*base, f"--screenshot={Path(screenshot).resolve()}", "--window-size=1300,2400", url], timeout)
    body = re.search(r"<body([^>]*)>", dom)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))) if body else {}
    return BrowserCheck(
        images_ok=attrs.get("images-ok") == "true",
        image_count=int(attrs.get("image-count", 0)),
        table_count=int(attrs.get("table-count", 0)),
        screenshot=screenshot if screenshot is not None and Path(screenshot).is_file() else None,
    )


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no message"]
        raise BilevelError(f"headless browser failed (exit {exc.returncode}): {last[0]}") from None
    except subprocess.TimeoutExpired:
        raise BilevelError(f"headless browser did not finish within {timeout:.0f} s") from None
