"""CC12M as in the seed: read the metadata TSV (url, caption), download the images into webdataset shards.

The engine is img2dataset (optional extra `pip install microvlm[cc12m]`): parallel workers and threads, timeouts,
retries, failures skipped and counted by reason, and resumable (`incremental` mode skips finished shards). This
module adapts CC12M's header-less TSV, adds `--test-samples N` (the first N rows), and sums img2dataset's per-shard
stats into one `_meta/stats.json`. The shards load with `load_image_text_dataset(output_dir)`.

    python -m microvlm.data.cc12m cc12m.tsv data/cc12m --test-samples 1000
"""

import argparse
import glob
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Our own files go in a sub-folder: img2dataset reads every "<shard>_*" name in the output folder as its own.
META_DIR = "_meta"


def _normalised_tsv(tsv_path: Path, output_dir: Path, test_samples: int | None) -> Path:
    """CC12M's TSV has no header: write one with `url` and `caption` columns (first `test_samples` rows only)."""
    rows = []
    with open(tsv_path, encoding="utf-8") as source:
        for line_number, line in enumerate(source, start=1):
            if test_samples is not None and len(rows) >= test_samples:
                break
            fields = line.rstrip("\n").split("\t")
            if line_number == 1 and fields[:2] == ["url", "caption"]:
                continue
            if len(fields) < 2 or not fields[0].strip():
                raise ValueError(f"{tsv_path}:{line_number}: expected 'url<TAB>caption', got {line[:80]!r}")
            rows.append(f"{fields[0].strip()}\t{fields[1].strip()}")
    target = output_dir / META_DIR / "input.tsv"
    target.parent.mkdir(parents=True, exist_ok=True)
    content = "url\tcaption\n" + "\n".join(rows) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != content:  # unchanged input keeps resume valid
        target.write_text(content, encoding="utf-8")
    return target


def download_cc12m(
    tsv_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    workers: int = 4,
    threads: int = 16,
    timeout: float = 10.0,
    retries: int = 2,
    test_samples: int | None = None,
    image_size: int | None = None,
    shard_size: int = 10_000,
) -> dict:
    """Download CC12M images into webdataset shards under `output_dir`; returns (and writes) the stats:
    `{"total", "ok", "failed": {reason: count}}`. Re-running resumes: finished shards are not fetched again."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would ask PyPI otherwise
    try:
        from img2dataset import download
    except ImportError as error:
        raise ImportError("CC12M download needs img2dataset: pip install 'microvlm[cc12m]'") from error
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    url_list = _normalised_tsv(Path(tsv_path), output_dir, test_samples)
    download(
        url_list=str(url_list),
        input_format="tsv",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(output_dir),
        processes_count=workers,
        thread_count=threads,
        timeout=timeout,
        retries=retries,
        image_size=image_size or 256,
        resize_mode="keep_ratio" if image_size else "no",
        number_sample_per_shard=shard_size,
        incremental_mode="incremental",
        distributor="multiprocessing",
        enable_wandb=False,
        disallowed_header_directives=[],
    )
    failed: dict[str, int] = {}
    ok = total = 0
    for path in sorted(glob.glob(str(output_dir / "*_stats.json"))):
        shard = json.loads(Path(path).read_text())
        ok += shard["successes"]
        total += shard["count"]
        for reason, count in shard["status_dict"].items():
            if reason != "success":
                failed[reason] = failed.get(reason, 0) + count
    stats = {"total": total, "ok": ok, "failed": failed}
    (output_dir / META_DIR / "stats.json").write_text(json.dumps(stats, indent=2))
    logger.info("CC12M: %d of %d images downloaded; failures %s", ok, total, failed)
    return stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tsv", help="CC12M metadata: url<TAB>caption per line")
    parser.add_argument("output_dir")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--test-samples", "--test_samples", dest="test_samples", type=int, default=None)
    parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None)
    parser.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=10_000)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return download_cc12m(
        args.tsv,
        args.output_dir,
        args.workers,
        args.threads,
        args.timeout,
        args.retries,
        args.test_samples,
        args.image_size,
        args.shard_size,
    )


if __name__ == "__main__":
    main()
