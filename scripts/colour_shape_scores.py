"""Colour and shape of a saved model's captions, on seen and on held-out colour–shape pairs: the scoring of the
README's stage-1 table ("Where the colour comes in") and of the errors it lists.

Greedy captions of the built-in test split's caption images (through `microvlm.eval`, as the main job's report
makes them), colour / shape accuracy on seen and on held-out pairs, the shape question ("what shape is shown?")
asked of each held-out caption image, and the held-out pairs' wrong (colour, shape) answers with their counts.

    python scripts/colour_shape_scores.py --model_dir outputs/demo/stage1                    # the table's scoring
    python scripts/colour_shape_scores.py --model_dir outputs/demo/stage2 --seed 42 --num_test 600   # the report's
"""

import collections
import logging
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from microvlm.data.synthetic_shapes import QUESTIONS, parse_attributes
from microvlm.eval.cli import CONDITIONS, EvalArguments, answers, caption_scores, load_context, test_rows


logger = logging.getLogger("colour_shape_scores")
CAPTIONS, SHAPE_QUESTIONS = (
    next(c for c in CONDITIONS if (c.section, c.name) == (s, "model")) for s in ("captions", "qa")
)


@dataclass
class ScoreArguments:
    model_dir: str = field(metadata={"help": "a saved MicroVLM folder"})
    seed: int = field(default=0, metadata={"help": "seed of the built-in test split (the table: 0; the report: 42)"})
    num_test: int = field(default=1200, metadata={"help": "test samples; a third of them are captions"})


def main() -> None:
    (args,) = HfArgumentParser(ScoreArguments).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = load_context(EvalArguments(model_dir=args.model_dir, num_test=args.num_test, seed=args.seed))
    captions = test_rows(ctx)["captions"]
    predicted = answers(ctx, CAPTIONS, captions)
    scores = caption_scores(predicted, captions)
    held_out = [row for row in captions if row["held_out"]]
    shape_questions = [
        {"kind": "qa", "image": row["image"], "text": QUESTIONS["shape"], "answer": row["shape"]} for row in held_out
    ]
    replies = answers(ctx, SHAPE_QUESTIONS, shape_questions)
    shape_answered = sum(reply == row["answer"] for reply, row in zip(replies, shape_questions)) / len(held_out)
    seen, held = scores["attributes_seen_pairs"], scores["attributes_held_out_pairs"]
    logger.info(
        "%d seen and %d held-out captions. Seen pairs colour / shape %.1f / %.1f%%; held-out pairs %.1f / %.1f%%; "
        "held-out shape question %.1f%%",
        len(captions) - len(held_out),
        len(held_out),
        100 * seen["colour"],
        100 * seen["shape"],
        100 * held["colour"],
        100 * held["shape"],
        100 * shape_answered,
    )
    errors = collections.Counter()
    for text, row in zip(predicted, captions):
        said = parse_attributes(text)
        if row["held_out"] and (said["colour"], said["shape"]) != (row["colour"], row["shape"]):
            errors[(row["colour"], row["shape"], said["colour"], said["shape"])] += 1
    for (colour, shape, said_colour, said_shape), count in errors.most_common():
        logger.info("held-out %s %s named %s %s: %d", colour, shape, said_colour, said_shape, count)


if __name__ == "__main__":
    main()
