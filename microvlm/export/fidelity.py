"""Fidelity of exported models against the full-precision one, from `microvlm.eval`'s results:
`python -m microvlm.export.fidelity fp=A/eval_results.json qat=B/eval_results.json ...` (the first is the reference).

Logs a table of the issue's figures (caption attributes, question exact match, recall) in %, each with its
difference from the reference in points, marked ✗ beyond `GOAL_POINTS`.
"""

import json
import logging
import sys
from pathlib import Path


logger = logging.getLogger("microvlm.export.fidelity")
GOAL_POINTS = 5.0
FIGURES = {
    "caption attributes, mean": lambda r: r["captions"]["model"]["attributes"]["mean"],
    "caption attributes, held-out pairs": lambda r: r["captions"]["model"]["attributes_held_out_pairs"]["mean"],
    "question exact match": lambda r: r["qa"]["model"],
    "recall exact match (memory)": lambda r: r["recall"]["memory"],
    "image→text R@1": lambda r: r["retrieval"]["model"]["image_to_text_r@1"],
}


def fidelity_table(results: dict[str, dict]) -> str:
    """Markdown table: one column per named result, the first being the reference."""
    names = list(results)
    reference = results[names[0]]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for figure, read in FIGURES.items():
        base = 100 * read(reference)
        cells = [f"{base:.1f}%"]
        for name in names[1:]:
            value = 100 * read(results[name])
            mark = " ✗" if abs(value - base) > GOAL_POINTS else ""
            cells.append(f"{value:.1f}% ({value - base:+.1f}{mark})")
        lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    pairs = [item.split("=", 1) for item in (sys.argv[1:] if argv is None else argv)]
    if len(pairs) < 2 or any(len(pair) != 2 for pair in pairs):
        raise SystemExit("usage: python -m microvlm.export.fidelity NAME=eval_results.json ... (first: reference)")
    table = fidelity_table({name: json.loads(Path(path).read_text()) for name, path in pairs})
    logger.info("fidelity (points from %s; ✗ beyond %.0f):\n%s", pairs[0][0], GOAL_POINTS, table)
    return table


if __name__ == "__main__":
    main()
