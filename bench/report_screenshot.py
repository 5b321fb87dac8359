"""A full-page screenshot of a run's report.html in headless Chromium (Debian's `chromium`), cropped to the page
and scaled to a width, e.g. the README's picture of the demo's report:

    .venv/bin/python bench/report_screenshot.py runs/demo docs/report.png [--width 650]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=650)
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        sys.exit("no chromium on this machine (apt-get install chromium)")
    page = (args.run / "report.html").resolve()
    if not page.exists():
        sys.exit(f"{page}: no report (run the pipeline first)")
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--screenshot={shot}", "--window-size=1300,16000",
                        page.as_uri()], capture_output=True, timeout=180, check=True)
        img = Image.open(shot).convert("RGB")
    rows = (np.asarray(img) < 242).any(axis=(1, 2)).nonzero()[0]
    img = img.crop((0, 0, img.width, min(img.height, int(rows[-1]) + 40)))
    img = img.resize((args.width, round(img.height * args.width / img.width)), Image.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out, optimize=True)
    print(f"{args.out}: {img.width} x {img.height}")


if __name__ == "__main__":
    main()
