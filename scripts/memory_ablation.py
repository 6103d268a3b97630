"""One row of the README's "What was tried" table for the memory: stage 2 from a stage-1 folder, then a quick recall
evaluation with `microvlm.eval`'s own conditions (`microvlm/eval/cli.py`).

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

from microvlm.data.collator import MicroVLMCollator
from microvlm.eval import cli as evaluation
from microvlm.train.cli import main as train


def recall_figures(model_dir: str, num_test: int, seed: int) -> dict:
    args = evaluation.EvalArguments(model_dir=model_dir, num_test=num_test, batch_size=40, seed=seed, episode_size=4)
    ctx = evaluation.load_context(args)
    row_sets = evaluation.test_rows(ctx)
    recalls = row_sets["recalls"]
    first = MicroVLMCollator(ctx.processor, with_episodes=True)(recalls[:1])
    ctx.written = ctx.model.write_episodes(**evaluation.episodes(first))
    conditions = {c.name: c for c in evaluation.CONDITIONS if c.section == "recall"}
    predictions = {
        name: evaluation.answers(ctx, conditions[name], row_sets[conditions[name].rows])
        for name in (
            "memory",
            "no memory",
            "another episode's memory",
            "after forgetting the asked image",
            "after editing",
        )
    }
    long = list(
        evaluation.build_synthetic_dataset(
            0,
            0,
            60,
            image_size=ctx.model.config.vision_config.image_size,
            episode_size=8,
            seed=seed + 8,
            kinds=("recall",),
        )["test"]
    )
    match, answers = evaluation.exact_match, [row["answer"] for row in recalls]
    edited_answers = [row["edited answer"] for row in row_sets["recall edits"]]
    return {
        "memory": match(predictions["memory"], answers),
        "memory off": match(predictions["no memory"], answers),
        "another episode": match(predictions["another episode's memory"], answers),
        "forgotten": match(predictions["after forgetting the asked image"], answers),
        "edited, new answer": match(predictions["after editing"], edited_answers),
        "edited, old answer": match(predictions["after editing"], answers),
        "by attribute": evaluation.exact_match_by(predictions["memory"], recalls, "asked", evaluation.ATTRIBUTES),
        "scope": evaluation.scope_decisions(ctx, row_sets["all"]),
        "8-image episodes": match(
            evaluation.answers(ctx, conditions["memory"], long), [row["answer"] for row in long]
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
