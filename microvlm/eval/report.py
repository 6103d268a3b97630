"""The evaluation report: PNG plots and a Markdown file of tables, from `cli.py`'s `EvalResults`."""

import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data.collator import MicroVLMCollator  # noqa: E402
from .cli import scored_keys  # noqa: E402
from .results import EvalResults  # noqa: E402
from .visualisation import memory_addressing  # noqa: E402


def _loss_curves(model_dir: Path, path: Path) -> bool:
    """Training loss terms of every stage found beside the model (trainer_state.json files)."""
    states = sorted({*model_dir.parent.glob("*/trainer_state.json"), *model_dir.glob("trainer_state.json")})
    if not states:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for state_file in states:
        history = json.loads(state_file.read_text())["log_history"]
        for term in ("loss", "lm_loss", "alignment_loss"):
            points = [(e["step"] + offset, e[term]) for e in history if term in e]
            if points:
                axis.plot(*zip(*points), label=f"{state_file.parent.name}: {term}")
        offset += max((e["step"] for e in history), default=0)
    axis.set_xlabel("step (stages end to end)")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


@torch.no_grad()
def _attention_over_images(model, processor, rows: list[dict], path: Path) -> None:
    """The adapter's pooling attention, averaged over its queries, as a heat map over each image's patch grid."""
    batch = MicroVLMCollator(processor)(rows)
    features = model.model.get_image_features(batch["pixel_values"], output_attentions=True)
    side = int(model.config.num_patches**0.5)
    figure, axes = plt.subplots(2, len(rows), figsize=(2.2 * len(rows), 4.6))
    for column, row in enumerate(rows):
        heat = features.attention[column].mean(0).view(side, side).float()
        axes[0, column].imshow(row["image"])
        axes[0, column].set_title(row["text"], fontsize=6)
        axes[1, column].imshow(row["image"])
        axes[1, column].imshow(
            heat.numpy(), alpha=0.6, cmap="inferno", extent=(0, row["image"].width, row["image"].height, 0)
        )
        for axis in axes[:, column]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _similarity(similarity: torch.Tensor, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(similarity.float().numpy(), cmap="viridis")
    axis.set_xlabel("caption")
    axis.set_ylabel("image")
    axis.set_title("retrieval: image–caption cosine similarity")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_plots(output: Path, model_dir: str, model, processor, captions, recalls, similarity) -> dict[str, str]:
    plots = {}
    if _loss_curves(Path(model_dir), output / "loss_curves.png"):
        plots["training losses"] = "loss_curves.png"
    _attention_over_images(model, processor, captions[:6], output / "image_attention.png")
    plots["adapter attention over the image (bottom row)"] = "image_attention.png"
    _similarity(similarity, output / "retrieval_similarity.png")
    plots["retrieval similarity matrix"] = "retrieval_similarity.png"
    if recalls:
        batch = MicroVLMCollator(processor, with_episodes=True)(recalls[:4])
        figure = memory_addressing(model, batch)
        figure.savefig(output / "memory_addressing.png", dpi=90)
        plt.close(figure)
        plots["memory addressing (episode step × slot)"] = "memory_addressing.png"
    return plots


ATTRIBUTE_NAMES = ("colour", "shape", "count", "position")


def _row(*cells: str) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _real_photo_lines(results: EvalResults) -> list[str]:
    photos = results.real_photos
    if not photos:
        return []
    examples = "; ".join(f"{e['photo']}: “{e['generated']}”" for e in photos["examples"][:5])
    return [
        "## Real photos (smoke test)",
        "",
        f"{photos['count']} photos from scikit-image, scikit-learn and matplotlib: "
        f"BLEU-4 {photos['bleu']:.1f}, ROUGE-L {photos['rouge_l']:.3f}, CIDEr-D {photos['cider_d']:.2f}. {examples}",
        "",
    ]


def write_report(path: Path, results: EvalResults, plots: dict[str, str]) -> None:
    captions = results.captions
    chance = captions["chance"]["attributes"]
    lines = [
        f"# MicroVLM evaluation: `{results.model_dir}`",
        "",
        f"Built-in shapes set, test split: {results.counts}. Baselines come from the same run.",
        "",
        "## Captions",
        "",
        _row(
            "inputs", "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", *ATTRIBUTE_NAMES, "all four", "held-out pairs (mean)"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("model", "blank images", "shuffled images", "memory on"):
        c = captions[name]
        a = c["attributes"]
        meteor = f"{c['meteor']:.3f}" if "meteor" in c else "–"  # needs Java and microvlm[meteor]
        lines.append(
            _row(
                name,
                f"{c['bleu']:.1f}",
                f"{c['rouge_l']:.3f}",
                f"{c['cider_d']:.2f}",
                meteor,
                *(_pct(a[n]) for n in (*ATTRIBUTE_NAMES, "all")),
                _pct(c["attributes_held_out_pairs"]["mean"]),
            )
        )
    lines.append(
        f"| chance | | | | | {_pct(chance['colour'])} | {_pct(chance['shape'])} | {_pct(chance['count'])} | "
        f"{_pct(chance['position'])} | {_pct(chance['all'])} | |"
    )
    lines += [
        "",
        f"Perplexity of the captions: {results.perplexity['model']:.2f} (uniform: {results.perplexity['chance']}).",
        "",
        "Examples: " + "; ".join(f"“{e['generated']}” for “{e['reference']}”" for e in captions["examples"][:4]),
        "",
        "## Questions",
        "",
        "| inputs | exact match |",
        "|---|---|",
        f"| model | {_pct(results.qa['model'])} |",
        f"| blank images | {_pct(results.qa['blank images'])} |",
        f"| memory on (a written episode; ScopeNet should keep it out) | {_pct(results.qa['memory on'])} |",
        f"| chance | {_pct(results.qa['chance'])} |",
        "",
        *(
            line
            for pairs in ("seen_pairs", "held_out_pairs")
            for line in (
                f"By asked attribute, {pairs.replace('_', ' ')}: "
                + ", ".join(f"{name}: {_pct(value)}" for name, value in results.qa[f"by_attribute_{pairs}"].items()),
                "",
            )
        ),
        *_real_photo_lines(results),
        f"## Retrieval ({results.retrieval['candidates']} candidates)",
        "",
        "| | R@1 | R@5 |",
        "|---|---|---|",
    ]
    r = results.retrieval["model"]
    lines += [
        f"| image → text | {_pct(r['image_to_text_r@1'])} | {_pct(r['image_to_text_r@5'])} |",
        f"| text → image | {_pct(r['text_to_image_r@1'])} | {_pct(r['text_to_image_r@5'])} |",
        f"| chance | {_pct(results.retrieval['chance']['r@1'])} | {_pct(results.retrieval['chance']['r@5'])} |",
        "",
        f"## Episodic recall (memory of {results.recall['slots']} slots)",
        "",
        "| memory | exact match |",
        "|---|---|",
    ]
    for name in (*scored_keys("recall"), "chance"):
        lines.append(f"| {name} | {_pct(results.recall[name])} |")
    scope = results.scope
    lines += [
        "",
        "By position of the asked image in the episode: "
        + ", ".join(f"{k}: {_pct(v)}" for k, v in results.recall["by_position"].items()),
        "",
        "By asked attribute: " + ", ".join(f"{k}: {_pct(v)}" for k, v in results.recall["by_attribute"].items()),
        "",
        f"ScopeNet decisions: {_pct(scope['accuracy'])} right (recall rows let in {_pct(scope['recall rows on'])}, "
        f"caption/question rows kept out {_pct(scope['caption/qa rows off'])}).",
        "",
        "Capacity (episode length: accuracy): "
        + ", ".join(f"{k}: {_pct(v)}" for k, v in results.recall["capacity"].items()),
        "",
        "## Analysis",
        "",
        "Sliced Epps–Pulley (LeJEPA; lower is more Gaussian), beside a Monte-Carlo null of Gaussian samples of the "
        "same N, D:",
        "",
        "| embeddings | N × D | statistic | null mean | null 95% |",
        "|---|---|---|---|---|",
    ]
    for name in ("projected_cls", "pooled_prefix", "mean_text"):
        e = results.analysis[name]
        lines.append(
            _row(
                name,
                f"{e['n']} × {e['dim']}",
                *(f"{v:.3f}" for v in (e["statistic"], e["null"]["mean"], e["null"]["q95"])),
            )
        )
    probe = results.analysis["vision_probe"]
    lines += [
        "",
        f"Linear probes (ridge, trained on {probe['rows_train']} test images, scored on the other "
        f"{probe['rows_test']}): what the image encoder makes linearly readable.",
        "",
        "| features | colour | shape | count | position |",
        "|---|---|---|---|---|",
    ]
    for name, title in (
        ("pooled_vision", "vision tower, CLS or mean of patch tokens"),
        ("prefix", "adapter prefix, flattened"),
        ("chance", "chance"),
    ):
        cells = " | ".join(_pct(probe[name][a]) for a in ATTRIBUTE_NAMES)
        lines.append(f"| {title} | {cells} |")
    a, m = results.analysis["prefix_attention"], results.analysis["memory_slots"]
    lines += [
        "",
        f"Text → prefix attention: entropy {a['entropy']:.3f} nats ({a['normalised_entropy']:.2f} of uniform), "
        f"sparsity {a['sparsity']:.2f}, Gini {a['gini']:.2f}.",
        f"Memory slots: {m['active_fraction']:.2f} of {m['slots']} active, effective {m['effective_slots']:.1f}.",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{title}]({file})" for title, file in plots.items()]
    path.write_text("\n".join(lines) + "\n")
