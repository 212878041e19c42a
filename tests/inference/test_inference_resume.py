"""`crowdllm annotate` killed with SIGKILL at a random point, then re-run, against the fake server.

The resumed ledger must equal an uninterrupted run's (same records, no duplicates, nothing
lost), and the re-run must ask only for the items missing from the ledger. The same property
is checked against the real vLLM server in ``test_inference_vllm.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from crowdllm.inference.ledger import Ledger, record_key
from fake_openai import FakeOpenAI, item_text
from test_inference_fake_server import write_items, write_panel

COMPARE = ("task", "model", "prompt_version", "raw", "label", "abstained", "probs",
           "prompt_tokens", "completion_tokens", "attempts", "attempt_tokens", "finish_reason",
           "endpoint_model")


def annotate_cmd(items: Path, panel: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "crowdllm.cli", "annotate", str(items), "--panel", str(panel),
            "--out", str(run), "--no-progress"]


def run_killed(cmd: list[str], ledger: Path, kill_after_lines: int, timeout: float = 120) -> int:
    """Start ``cmd``, SIGKILL it once the ledger has ``kill_after_lines`` lines; lines then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            n = len(ledger.read_bytes().splitlines()) if ledger.exists() else 0
            if n >= kill_after_lines:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise AssertionError("annotate finished before it could be killed")
            time.sleep(0.01)
        else:
            raise AssertionError("annotate made no progress")
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(Ledger(ledger).records())


def comparable(records: list[dict]) -> dict[tuple, tuple]:
    return {record_key(r): tuple(json.dumps(r[k], sort_keys=True) for k in COMPARE) for r in records}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    rng = random.Random(6)
    texts = [f"Segment {i}: we measured {rng.randint(1, 99)} samples." for i in range(30)]
    texts[4] += " [oosx1]"   # one re-ask
    texts[9] += " [oos]"     # one abstention
    items = write_items(tmp_path / "items.csv", texts)
    with FakeOpenAI(delay_s=0.03, vllm_like=True) as srv:
        panel = write_panel(tmp_path / "panel.toml", srv.base_url, n=2,
                            concurrency=2, constrain="false")
        ref = tmp_path / "ref"
        subprocess.run(annotate_cmd(items, panel, ref), check=True, timeout=300)
        reference = Ledger(ref / "ledger.jsonl").records()
        assert len(reference) == 60

        srv.reset()  # scripted faults start over for the killed run
        run = tmp_path / "run"
        kill_at = rng.randint(5, 40)
        before = run_killed(annotate_cmd(items, panel, run), run / "ledger.jsonl", kill_at)
        assert kill_at <= before < 60
        done = {record_key(r) for r in Ledger(run / "ledger.jsonl").records()}
        srv.reset()
        subprocess.run(annotate_cmd(items, panel, run), check=True, timeout=300)

        # only the missing (item, annotator) pairs were asked
        asked = {(item_text(b["messages"]), b["model"]) for b in srv.requests}
        by_text = {t: f"t{i:03d}" for i, t in enumerate(texts)}
        served = {"served-0": "fake-0", "served-1": "fake-1"}
        asked_keys = {(by_text[t], served[m]) for t, m in asked}
        missing = {(k[0], k[1]) for k in comparable(reference)} - {(k[0], k[1]) for k in done}
        assert asked_keys == missing

        lines = (run / "ledger.jsonl").read_bytes().splitlines()
        assert len(lines) == 60  # no duplicates, nothing lost
        assert comparable(Ledger(run / "ledger.jsonl").records()) == comparable(reference)
