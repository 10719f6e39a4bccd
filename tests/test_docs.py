"""Generated docs stay true: docs/config.md is what `python -m cluster.config --markdown` prints."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    out = subprocess.run([sys.executable, "-m", "cluster.config", "--markdown"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    committed = (ROOT / "docs" / "config.md").read_text()
    assert out.strip() in committed, "docs/config.md is stale: regenerate it (see its header)"
