"""One row of the README's "What was tried" table for the memory: stage 2 from a stage-1 folder, then a quick recall
evaluation with `microvlm.eval`'s own functions.

    python scripts/memory_ablation.py --stage1 runs/s1 --output_dir runs/ablation -- --learning_rate 1e-3 \
        --episode_size 8 --min_episode_size 2

Everything after `--` goes to `python -m microvlm.train --stage stage2 --recipe demo`. The table's stage-1 model
was `--stage stage1 --recipe demo --max_steps 800` with the DeiT tower of the time. Prints one JSON line: recall
with the memory, without it, with another episode's memory, after forgetting, after editing (new and old answer),
by asked attribute, ScopeNet's decisions, and recall on 8-image episodes.
"""

import argparse
import json
import logging

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from microvlm import eval as evaluation
from microvlm.data.collator import MicroVLMCollator
from microvlm.train import main as train


def recall_figures(model_dir: str, num_test: int, seed: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    args = evaluation.EvalArguments(model_dir=model_dir, num_test=num_test, batch_size=40, seed=seed)
    size = model.config.vision_config.image_size
    rows = list(evaluation.build_synthetic_dataset(0, 0, num_test, image_size=size, episode_size=4, seed=seed)["test"])
    recalls = [row for row in rows if row["kind"] == "recall"]
    answers = [row["answer"] for row in recalls]
    with_memory = evaluation.generate(model, processor, recalls, args, "memory", with_episodes=True)
    edits = evaluation.recall_after_memory_edits(model, processor, recalls, args)
    first = MicroVLMCollator(processor, with_episodes=True)(recalls[:1])
    written = model.write_episodes(
        first["episode_input_ids"],
        first["episode_attention_mask"],
        first["episode_pixel_values"],
        first["episode_mask"],
    )
    long = list(
        evaluation.build_synthetic_dataset(
            0, 0, 60, image_size=size, episode_size=8, seed=seed + 8, kinds=("recall",)
        )["test"]
    )
    match = evaluation.exact_match
    return {
        "memory": match(with_memory, answers),
        "memory off": match(evaluation.generate(model, processor, recalls, args, "off", use_memory=False), answers),
        "another episode": match(
            evaluation.generate(
                model, processor, recalls, args, "other", with_episodes=True, episodes=evaluation.other_episode
            ),
            answers,
        ),
        "forgotten": match(edits["after forgetting the asked image"], answers),
        "edited, new answer": match(edits["after editing"], edits["edited answers"]),
        "edited, old answer": match(edits["after editing"], answers),
        "by attribute": {
            name: match(
                [p for p, r in zip(with_memory, recalls) if r["asked"] == name],
                [r["answer"] for r in recalls if r["asked"] == name],
            )
            for name in evaluation.ATTRIBUTES
        },
        "scope": evaluation.scope_decisions(model, processor, rows, args, written),
        "8-image episodes": match(
            evaluation.generate(model, processor, long, args, "8 images", with_episodes=True),
            [row["answer"] for row in long],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", required=True, help="a stage-1 model folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_test", type=int, default=360, help="test rows; a third are recall questions")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("train_args", nargs="*", help="after --: flags for microvlm.train")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    train(
        [
            "--stage",
            "stage2",
            "--recipe",
            "demo",
            "--init_from",
            args.stage1,
            "--output_dir",
            args.output_dir,
            "--eval_strategy",
            "no",
            "--save_steps",
            "100000",
            *args.train_args,
        ]
    )
    torch.manual_seed(args.seed)
    print(json.dumps(recall_figures(args.output_dir, args.num_test, args.seed)))


if __name__ == "__main__":
    main()
