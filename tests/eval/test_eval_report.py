"""`crowdllm report` writes its folder; headless Chromium opens index.html and every figure loads."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from crowdllm.cli import main
from crowdllm.eval.synthetic import write_synthetic_run

CHROMIUM = "/usr/bin/chromium"

CHECK = """<script>
window.addEventListener('load', () => {
  const r = document.createElement('pre'); r.id = 'image-check';
  r.textContent = JSON.stringify([...document.images].map(
      i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0 && i.naturalHeight > 0]));
  document.body.appendChild(r);
});
</script></body>"""


def images_loaded(html_file: Path, tmp: Path) -> list[list]:
    """Open ``html_file`` in headless Chromium; return [src, loaded] for every <img>."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: tests/run.sh installs Debian's chromium package")
    probe = html_file.with_name("_probe.html")
    probe.write_text(html_file.read_text(encoding="utf-8").replace("</body>", CHECK), encoding="utf-8")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=90)
    probe.unlink()
    m = re.search(r'<pre id="image-check">(.*?)</pre>', out.stdout, re.S)
    assert m, f"chromium printed no check result (rc={out.returncode}): {out.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


def test_report_folder_opens_in_chromium(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_items=40, seed=1)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", str(run), "--gold", str(run / "gold.csv"),
                                    "--out", str(out), "--by", "domain", "-m", "mv,ds", "--svg",
                                    "--frontier-methods", "mv",
                                    "--reference", "sim-api-large"])
    assert res.exit_code == 0, res.output
    for name in ("index.html", "report.md", "evaluation.csv", "confusion.csv", "agreement.csv",
                 "groups.csv", "cost.csv", "frontier.csv", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["accuracy.png", "accuracy_by_group.png", "cost_vs_accuracy.png",
                       "kappa_heatmap.png"]
    for svg in (out / "figures").glob("*.svg"):
        assert ET.parse(svg).getroot().tag.endswith("svg")
    assert len(list((out / "figures").glob("*.svg"))) == 4
    # the tables agree with each other
    with open(out / "evaluation.csv") as fh:
        rows = {r["system"]: r for r in csv.DictReader(fh)}
    assert {"mv", "ds", "sim-api-large", "sim-small-a"} <= set(rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "sim-api-large"
    md = (out / "report.md").read_text()
    assert "## Cost" in md and "## Accuracy per domain" in md and "panel" in md
    html = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(Path(s).name for s in srcs) == figures
    for href in re.findall(r'<a href="([^"]+)"', html):
        assert (out / href).exists(), href
    # the folder is self-contained: moved elsewhere, it still shows every figure
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    loaded = images_loaded(moved / "index.html", tmp_path)
    assert len(loaded) == len(figures)
    assert all(ok for _, ok in loaded), loaded


def test_report_on_a_crowd_without_ledger(tmp_path):
    from crowdllm.cli import example_dir

    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["report", "example", "--gold", "example", "--out", str(out),
                                    "-m", "mv"])
    assert res.exit_code == 0, res.output
    assert not (out / "cost.csv").exists()
    assert (out / "figures" / "kappa_heatmap.png").exists()
    assert "no annotator answered 50%" in (out / "report.md").read_text()
    assert example_dir().exists()
