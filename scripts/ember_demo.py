"""EmberVLM's short run: the tiny-ember preset through the four stages of `configs/ember.json` (alignment,
instruction tuning, robot selection, reasoning heads then everything), then robot-selection accuracy on the
built-in set's test split beside chance, the majority class and the best one-attribute rule.

    OMP_NUM_THREADS=1 python scripts/ember_demo.py --output_dir runs/ember [-- extra train flags]

Everything after `--` goes to `python -m microvlm.train --recipe ember --stage <all five>`. Prints one JSON line.
"""

import argparse
import json
import logging

import torch

from microvlm import MicroVLMForCausalLM, MicroVLMProcessor
from microvlm.data.robot_selection import build_robot_selection_dataset
from microvlm.eval.robot_selection import majority_baseline, robot_selection_accuracy, single_attribute_baselines
from microvlm.train.cli import main as train


STAGES = "stage1,stage2,robot_selection,reasoning_heads,reasoning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/ember")
    parser.add_argument("--num_test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="data seed of the evaluated test split")
    parser.add_argument("train_args", nargs="*", help="after --: extra flags for python -m microvlm.train")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folders = train(["--recipe", "ember", "--stage", STAGES, "--output_dir", args.output_dir, *args.train_args])
    logging.getLogger().setLevel(logging.WARNING)
    model = MicroVLMForCausalLM.from_pretrained(folders[-1]).eval()
    processor = MicroVLMProcessor.from_pretrained(folders[-1])
    splits = build_robot_selection_dataset(
        num_train=2000,
        num_validation=0,
        num_test=args.num_test,
        image_size=model.config.vision_config.image_size,
        seed=args.seed,
    )
    figures = {
        "model": robot_selection_accuracy(model, processor, splits["test"]),
        "majority_class": majority_baseline(splits["train"], splits["test"]),
        "single_attribute_rules": single_attribute_baselines(splits["train"], splits["test"]),
        "num_test": args.num_test,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
