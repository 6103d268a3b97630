"""The README's quick start runs exactly as written (in a scratch folder, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quick_start_runs_as_written(tmp_path):
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "my-microvlm" / "memory_state.safetensors").is_file()


def test_first_section_gives_exactly_two_commands():
    first = README.read_text().split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", first, re.S) == [
        "bash scripts/main_job.sh",
        "bash scripts/setup_and_test.sh",
    ]
