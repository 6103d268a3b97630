"""The README's quick start runs exactly as written (in a scratch folder, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).parents[1] / "README.md"


def first_python_block(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_offline(code: str, cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_quick_start_then_fine_tuning_run_as_written(tmp_path):
    run_offline(first_python_block("## Quick start"), tmp_path)
    assert (tmp_path / "my-microvlm" / "memory_state.safetensors").is_file()
    run_offline(first_python_block("## Fine-tuning with the Trainer, PEFT and TRL"), tmp_path)
    assert (tmp_path / "runs" / "lora" / "adapter" / "adapter_config.json").is_file()


def test_first_section_gives_exactly_two_commands():
    first = README.read_text().split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", first, re.S) == [
        "bash scripts/main_job.sh",
        "bash scripts/setup_and_test.sh",
    ]
