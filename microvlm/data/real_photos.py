"""The real-photo smoke set: photos that ship inside the scikit-image, scikit-learn and matplotlib wheels, with
hand-written reference captions committed in `assets/real_photos.json`. Offline; photos of packages that are not
installed are left out with one warning (`pip install microvlm[photos]` installs them all)."""

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image


logger = logging.getLogger(__name__)
CAPTIONS_FILE = Path(__file__).parents[1] / "assets" / "real_photos.json"


def load_real_photos() -> list[dict[str, Any]]:
    """[{"image": PIL RGB image, "references": [captions], "name": file name}] for every photo found."""
    samples, missing = [], set()
    for entry in json.loads(CAPTIONS_FILE.read_text())["photos"]:
        spec = importlib.util.find_spec(entry["package"])
        if spec is None or not spec.submodule_search_locations:
            missing.add(entry["package"])
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / entry["path"]
        if not path.is_file():
            missing.add(f"{entry['package']}/{entry['path']}")
            continue
        with Image.open(path) as image:
            samples.append({"image": image.convert("RGB"), "references": entry["captions"], "name": path.name})
    if missing:
        logger.warning("real-photo smoke set: not found, left out: %s", sorted(missing))
    return samples
