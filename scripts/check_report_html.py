#!/usr/bin/env python
"""Render an evaluation report.html in headless Chromium and check that it looks like a report.

    python scripts/check_report_html.py artifacts/eval/report.html [--png shot.png]

1. ``chromium --headless --screenshot``: fails when Chromium fails, or the PNG is missing or blank
   (nearly every pixel one colour).
2. ``chromium --headless --dump-dom``: fails unless the rendered DOM has the report headings, tables,
   at least ``--min-images`` embedded PNG plots (``data:image/png;base64``, decodable), no <script>
   element and no reference to an external resource.

Exit status: 0 all checks pass, 1 a DOM/content check failed, 2 Chromium failed or the screenshot is
missing/blank, 3 bad usage (no such file / no Chromium). Needs Debian's chromium
(``apt-get install -y chromium``) and numpy + matplotlib (which brings Pillow) for reading the PNG.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

REQUIRED_HEADINGS = ("Summary", "PPO vs SFT", "Reward and gold vs KL", "Score distributions", "Examples")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXIT_CONTENT, EXIT_BROWSER, EXIT_USAGE = 1, 2, 3


def run_chromium(
    chromium: str, url: str, extra: list[str], window: str, timeout: float
) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=profile)


def blank_stats(png: Path) -> dict:
    """Fraction of pixels in the most common colour, number of colours, fraction of saturated pixels."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(png))
    if img.dtype != np.uint8:  # float PNGs come back in [0, 1]
        img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    rgb = img[..., :3].reshape(-1, 3).astype(np.int64)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    _, counts = np.unique(packed, return_counts=True)
    sat = rgb.max(axis=1) - rgb.min(axis=1)
    return {
        "width": int(img.shape[1]),
        "height": int(img.shape[0]),
        "dominant_fraction": float(counts.max() / packed.size),
        "colours": int(counts.size),
        "saturated_fraction": float((sat > 60).mean()),
    }


class DomScan(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.headings: list[str] = []
        self.tables = 0
        self.imgs: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._heading = []
        elif tag == "table":
            self.tables += 1
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1
        for key in ("src", "href", "srcset", "action", "data", "poster"):
            v = (a.get(key) or "").strip().lower()
            if v.startswith(("http:", "https:", "//", "ftp:", "ws:", "wss:")):
                self.external.append(f"<{tag} {key}={v[:80]}>")
        style = (a.get("style") or "").lower()
        if "url(" in style and "url(data:" not in style:
            self.external.append(f"<{tag} style=url(...)>")

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)


def check_dom(dom: str, min_images: int, min_tables: int, headings=REQUIRED_HEADINGS) -> list[str]:
    """Problems found in the dumped DOM (empty list = fine)."""
    scan = DomScan()
    scan.feed(dom)
    problems = [f"missing heading {h!r} (found {scan.headings})" for h in headings if h not in scan.headings]
    if scan.tables < min_tables:
        problems.append(f"{scan.tables} <table> elements, expected >= {min_tables}")
    plots = [s for s in scan.imgs if s.startswith("data:image/png;base64,")]
    if len(plots) < min_images:
        problems.append(
            f"{len(plots)} embedded PNG <img> plots, expected >= {min_images} (all img srcs: "
            f"{[s[:40] for s in scan.imgs]})"
        )
    for i, src in enumerate(plots):
        try:
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError) as e:
            problems.append(f"plot {i}: bad base64 ({e})")
            continue
        if not raw.startswith(PNG_MAGIC) or len(raw) < 1000:
            problems.append(f"plot {i}: not a plausible PNG ({len(raw)} bytes)")
    if scan.scripts:
        problems.append(f"{scan.scripts} <script> element(s) in the DOM (responses not escaped?)")
    if scan.external:
        problems.append(f"external resources referenced: {scan.external[:5]}")
    print(
        f"DOM: {len(scan.headings)} headings, {scan.tables} tables, {len(plots)} embedded PNG plots, "
        f"{scan.scripts} scripts, {len(scan.external)} external refs"
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="report.html to check")
    ap.add_argument(
        "--png", type=Path, default=None, help="screenshot path (default: <html dir>/report_screenshot.png)"
    )
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--window-size", default="1280,2000")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per Chromium run")
    ap.add_argument("--min-images", type=int, default=3)
    ap.add_argument("--min-tables", type=int, default=2)
    ap.add_argument(
        "--max-dominant",
        type=float,
        default=0.995,
        help="the screenshot is blank when one colour covers more than this fraction of pixels",
    )
    args = ap.parse_args(argv)

    html_path = args.html.resolve()
    if not html_path.is_file():
        print(f"FAIL: no such file {html_path}", file=sys.stderr)
        return EXIT_USAGE
    if not Path(args.chromium).exists():
        print(f"FAIL: no Chromium at {args.chromium} (apt-get install -y chromium)", file=sys.stderr)
        return EXIT_USAGE
    png = (args.png or html_path.with_name("report_screenshot.png")).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    url = html_path.as_uri()

    # 1. screenshot
    try:
        p = run_chromium(args.chromium, url, [f"--screenshot={png}"], args.window_size, args.timeout)
    except subprocess.TimeoutExpired:
        print(f"FAIL: chromium --screenshot timed out after {args.timeout:.0f}s", file=sys.stderr)
        return EXIT_BROWSER
    if p.returncode != 0:
        print(f"FAIL: chromium --screenshot exited {p.returncode}\n{p.stderr[-3000:]}", file=sys.stderr)
        return EXIT_BROWSER
    if not png.is_file() or png.stat().st_size == 0:
        print(f"FAIL: chromium wrote no screenshot at {png}\n{p.stderr[-3000:]}", file=sys.stderr)
        return EXIT_BROWSER
    try:
        stats = blank_stats(png)
    except Exception as e:  # unreadable PNG
        print(f"FAIL: cannot read screenshot {png}: {e!r}", file=sys.stderr)
        return EXIT_BROWSER
    print(
        f"screenshot: {png} {stats['width']}x{stats['height']}, {stats['colours']} colours, "
        f"dominant colour {stats['dominant_fraction']:.1%}, saturated pixels {stats['saturated_fraction']:.2%}"
    )
    if stats["dominant_fraction"] > args.max_dominant or stats["colours"] < 16:
        print("FAIL: screenshot is blank (nearly all pixels one colour)", file=sys.stderr)
        return EXIT_BROWSER
    if stats["saturated_fraction"] < 0.001:
        print("warning: no coloured pixels in the screenshot; plots may not be in view or not rendered")

    # 2. DOM
    try:
        p = run_chromium(args.chromium, url, ["--dump-dom"], args.window_size, args.timeout)
    except subprocess.TimeoutExpired:
        print(f"FAIL: chromium --dump-dom timed out after {args.timeout:.0f}s", file=sys.stderr)
        return EXIT_BROWSER
    if p.returncode != 0 or "<body" not in p.stdout:
        print(
            f"FAIL: chromium --dump-dom exited {p.returncode} with {len(p.stdout)} chars\n{p.stderr[-3000:]}",
            file=sys.stderr,
        )
        return EXIT_BROWSER
    problems = check_dom(p.stdout, args.min_images, args.min_tables)
    for msg in problems:
        print(f"FAIL: {msg}", file=sys.stderr)
    if problems:
        return EXIT_CONTENT
    print("OK: report.html renders in headless Chromium with all headings, tables and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
