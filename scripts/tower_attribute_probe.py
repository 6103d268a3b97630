"""How fast can a vision tower learn the shapes set's attributes from pixels alone, and does it name the shape of a
held-out colour–shape pair? A diagnostic for the tiny preset's tower (README: "Teaching the tiny tower to see").

The tower of a preset (random weights, the preset's `vision_config`, or another given as JSON) is trained
with four linear heads (colour, shape, count, position) on its mean-pooled last feature map, straight
from the attribute labels: the strongest signal a VLM's captions could ever give it. Every `eval_every` steps it
prints the heads' accuracies on seen pairs and on held-out pairs (`HELD_OUT_PAIRS`, never in its training set).

    python scripts/tower_attribute_probe.py --steps 1000   # the tiny preset's two-stream tower
    python scripts/tower_attribute_probe.py --steps 1000 --vision_config '{"model_type": "resnet", "image_size": 64,
        "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1], "layer_type": "basic",
        "downsample_in_first_stage": false}'   # a single RGB ResNet (the tiny tower before)
"""

import json
import logging
import time
from dataclasses import dataclass, field

import datasets
import torch
from torch import nn
from transformers import AutoModel, HfArgumentParser

from microvlm import MicroVLMConfig, MicroVLMProcessor
from microvlm.data.synthetic_shapes import ATTRIBUTES, COLOURS, COUNTS, POSITIONS, SHAPES, build_synthetic_dataset


logger = logging.getLogger("tower_attribute_probe")
VALUES = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNTS), "position": list(POSITIONS)}


@dataclass
class ProbeArguments:
    preset: str = "tiny"
    vision_config: str | None = field(
        default=None, metadata={"help": "a vision config as JSON (with model_type) instead of the preset's"}
    )
    num_train: int = 4000
    num_test: int = 400
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    eval_every: int = 250
    seed: int = 0
    threads: int = 1


def images_and_labels(rows: datasets.Dataset, processor: MicroVLMProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption rows of the built-in set → pixel values (N, 3, H, W) and labels (N, 4), one column per attribute
    (index into `VALUES`)."""
    pixels = processor.image_processor(list(rows["image"]), return_tensors="pt")["pixel_values"]
    labels = [[VALUES[name].index(row[name]) for name in ATTRIBUTES] for row in rows]
    return pixels, torch.tensor(labels)


def shapes_split(
    split: str, count: int, held_out_fraction: float, args: ProbeArguments, size: int
) -> datasets.Dataset:
    """`count` caption rows of the built-in set's `split`, drawn as the VLM's training and test data are."""
    sizes = {"num_train": 0, "num_validation": 0, "num_test": 0, f"num_{split}": count}
    return build_synthetic_dataset(
        **sizes, image_size=size, seed=args.seed, kinds=("caption",), held_out_fraction=held_out_fraction
    )[split]


def main() -> None:
    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = {"vision_config": json.loads(args.vision_config)} if args.vision_config else {}
    config = MicroVLMConfig.from_preset(args.preset, **overrides)
    vision_config = config.vision_config
    tower = AutoModel.from_config(vision_config, **config.vision_tower_kwargs)
    processor = MicroVLMProcessor.from_preset(args.preset)
    size = vision_config.image_size
    train = images_and_labels(shapes_split("train", args.num_train, 0.0, args, size), processor)
    tests = {  # the validation split's draws for seen pairs, the test split's for held-out ones
        "seen pairs": images_and_labels(shapes_split("validation", args.num_test, 0.0, args, size), processor),
        "held-out pairs": images_and_labels(shapes_split("test", args.num_test, 1.0, args, size), processor),
    }

    def pooled(pixels: torch.Tensor) -> torch.Tensor:
        features = tower(pixel_values=pixels).last_hidden_state
        return features.mean((2, 3)) if features.dim() == 4 else features.mean(1)

    width = pooled(train[0][:1]).shape[-1]
    heads = nn.ModuleList(nn.Linear(width, len(VALUES[name])) for name in ATTRIBUTES)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=args.learning_rate)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, args.num_train, (args.batch_size,))
        features, labels = pooled(train[0][rows]), train[1][rows]
        loss = sum(nn.functional.cross_entropy(head(features), labels[:, i]) for i, head in enumerate(heads))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            tower.eval()
            with torch.no_grad():
                report = []
                for split, (pixels, labels) in tests.items():
                    features = pooled(pixels)
                    accuracy = [
                        (head(features).argmax(-1) == labels[:, i]).float().mean().item()
                        for i, head in enumerate(heads)
                    ]
                    report.append(f"{split} " + " / ".join(f"{100 * a:.0f}" for a in accuracy))
            tower.train()
            logger.info(
                "step %d (%.0f s), loss %.3f; %s / %s / %s / %s: %s",
                step,
                time.perf_counter() - start,
                loss.item(),
                *ATTRIBUTES,
                "; ".join(report),
            )


if __name__ == "__main__":
    main()
