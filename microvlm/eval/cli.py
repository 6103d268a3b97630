"""Evaluate a saved MicroVLM: `python -m microvlm.eval --model_dir D [--output_dir R]`.

Loads the folder through the Auto classes with `trust_remote_code` (as a user would), evaluates on the built-in
shapes set's test split (held-out colour–shape pairs included), and writes `eval_results.json`, `report.md` and
PNG plots. Every figure stands beside a baseline from the same run and its chance level:

* captions: BLEU-4, ROUGE-L, CIDEr-D (local `evaluate` modules), per-attribute accuracy parsed from the
  generated captions (seen and held-out pairs), perplexity; baselines: blank images and shuffled images.
* questions: exact match; baseline: blank images.
* retrieval: image→text and text→image R@1/R@5 among `num_retrieval` candidates (alignment head).
* episodic recall: exact match with the memory, without it, with an empty memory, with another row's episode,
  after forgetting the asked image, after another episode is written on top, and with the asked image in the
  input (the perception upper bound); accuracy by position in the episode; a capacity curve over episode
  lengths against the number of slots.
* real photos: captions generated for the photos shipped in scikit-image, scikit-learn and matplotlib
  (`data/real_photos.py`), scored against hand-written references — a smoke test, no quality bar.
* vision probe: linear (ridge) probes of colour, shape, count and position on the vision tower's pooled output
  (CLS, or mean of patch tokens) and on the adapter's flattened prefix, trained on one half of the test images,
  scored on the other.
* analysis: sliced Epps–Pulley (LeJEPA) of projected CLS, pooled prefix and mean text embeddings beside a
  Monte-Carlo null; attention entropy and sparsity over the prefix tokens; memory slot utilisation.

Every generated answer comes from one loop (`answers`) over one table (`CONDITIONS`): a condition is a row set,
an input transform and a memory set-up.
"""

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor, HfArgumentParser
from transformers.utils.logging import is_progress_bar_enabled

from ..alignment import text_token_mask
from ..data.collator import MicroVLMCollator
from ..data.real_photos import load_real_photos
from ..data.synthetic_shapes import (
    COLOURS,
    COUNTS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    build_synthetic_dataset,
    edited_recall_sample,
    parse_attributes,
)
from .analysis import (
    attention_stats,
    epps_pulley_null,
    linear_probe,
    recall_from_similarity,
    sliced_epps_pulley,
    slot_utilisation,
)
from .metrics import caption_metrics, load_metric
from .own_data import load_rows, score_answers, score_captions
from .results import EvalResults, HeadlineFigure
from .visualisation import eager_language_attention


logger = logging.getLogger("microvlm.eval")
ATTRIBUTES = {"colour": len(COLOURS), "shape": len(SHAPES), "count": len(COUNTS), "position": len(POSITIONS)}
EPISODE_KEYS = ("episode_input_ids", "episode_attention_mask", "episode_pixel_values", "episode_mask")


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "a saved MicroVLM folder (weights, config, processor, remote code)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to write the report (<model_dir>/eval)"})
    num_test: int = 600
    num_retrieval: int = 100
    episode_size: int | None = field(
        default=None, metadata={"help": "images per recall episode (default: the model's memory_episode_size)"}
    )
    capacity_episode_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    capacity_samples: int = 60
    batch_size: int = 32
    max_new_tokens: int = 12
    seed: int = 42
    num_slices: int = 256
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "your own data instead of the built-in set: an image folder with metadata.jsonl/.csv, webdataset "
            "shards or a Hub id (captions and retrieval, or questions with --question_column/--answer_column)"
        },
    )
    split: str = field(default="test", metadata={"help": "the split of --dataset to evaluate"})
    image_column: str = "image"
    text_column: str = field(default="text", metadata={"help": "caption column: one caption or a list of them"})
    question_column: str | None = None
    answer_column: str | None = field(default=None, metadata={"help": "answer column: one answer or a list"})


@dataclass
class EvalContext:
    """What every condition's generation shares: the model, its processor, the arguments, and two memories: the
    first recall episode written (`written`, for rows that should not read it) and the empty one (the prior)."""

    model: Any
    processor: Any
    args: EvalArguments
    written: Any = None
    empty: Any = None


# ---------------------------------------------------------------------------------------------- conditions

Inputs = dict[str, torch.Tensor]


def prompts(batch: Inputs) -> Inputs:
    """The prompt inputs of a prompts-only batch: ids, mask and images; no episodes, labels or targets."""
    return {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "pixel_values")}


def episodes(batch: Inputs) -> Inputs:
    """The batch's episodes (B, E, ...), as `forward`, `generate` and `write_episodes` take them."""
    return {key: batch[key] for key in EPISODE_KEYS}


def rolled(episode: Inputs) -> Inputs:
    """Each row's episode replaced by the next row's."""
    return {key: value.roll(1, dims=0) for key, value in episode.items()}


def asked_step(batch: Inputs) -> torch.Tensor:
    """(B, E) episode mask of the asked step alone."""
    steps = batch["episode_mask"]
    return torch.nn.functional.one_hot(batch["memory_target_step"], steps.shape[1]).to(steps.dtype) * steps


# A memory set-up turns a collated batch (and its rows) into the keyword arguments of `generate`.
MemorySetup = Callable[[EvalContext, Inputs, list[dict]], dict[str, Any]]


def reading(batch: Inputs, memory_state) -> dict[str, Any]:
    """The batch's prompts, reading `memory_state` (one memory, or one per row)."""
    return {**prompts(batch), "use_memory": True, "memory_state": memory_state}


def memory_off(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    return {**prompts(batch), "use_memory": False}


def written_memory(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """The first recall episode's memory, read by rows it does not concern (ScopeNet should keep them out)."""
    return reading(batch, ctx.written)


def empty_memory(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    return reading(batch, ctx.empty)


def own_episode(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """Each row reads the memory its own episode wrote (inside `forward`)."""
    return {**prompts(batch), **episodes(batch)}


def other_episode(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """Control: each row reads the memory written from the next row's episode."""
    return {**prompts(batch), **rolled(episodes(batch))}


def forgotten_memory(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """The row's episode written, then its asked step forgotten (`forget_episodes`: an exact undo)."""
    written = ctx.model.write_episodes(**episodes(batch))
    asked = {**episodes(batch), "episode_mask": asked_step(batch)}
    return reading(batch, ctx.model.forget_episodes(written, **asked))


def edited_memory(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """The asked step forgotten, then a different image (the row's `edited` sample, differing in the asked
    attribute) written in its place."""
    forgotten = forgotten_memory(ctx, batch, rows)["memory_state"]
    edited = MicroVLMCollator(ctx.processor, with_episodes=True, prompts_only=True)([row["edited"] for row in rows])
    replacement = {**episodes(edited), "episode_mask": asked_step(batch)}
    return reading(batch, ctx.model.write_episodes(**replacement, memory_state=forgotten))


def overwritten_memory(ctx: EvalContext, batch: Inputs, rows: list[dict]) -> dict[str, Any]:
    """The row's episode written, then the next row's episode written on top of it."""
    written = ctx.model.write_episodes(**episodes(batch))
    return reading(batch, ctx.model.write_episodes(**rolled(episodes(batch)), memory_state=written))


def blank(pixels: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(pixels)


def shuffled(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.roll(1, dims=0)


@dataclass(frozen=True)
class Condition:
    """One evaluated condition: greedy answers for the row set `rows`, the images passed through `pixels`, the
    memory set up by `memory`. `scored` maps each result key to the row field holding its reference answer."""

    section: str
    name: str
    rows: str
    memory: MemorySetup = memory_off
    pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
    scored: tuple[tuple[str, str], ...] = ()

    @property
    def with_episodes(self) -> bool:
        return self.memory in (own_episode, other_episode, forgotten_memory, edited_memory, overwritten_memory)

    @property
    def scores(self) -> tuple[tuple[str, str], ...]:
        return self.scored or ((self.name, "answer"),)


# Every generated answer of the evaluation, in the order of eval_results.json.
CONDITIONS = (
    Condition("captions", "model", "captions"),
    Condition("captions", "blank images", "captions", pixels=blank),
    Condition("captions", "shuffled images", "captions", pixels=shuffled),
    Condition("captions", "memory on", "captions", memory=written_memory),
    Condition("qa", "model", "questions"),
    Condition("qa", "memory on", "questions", memory=written_memory),
    Condition("qa", "blank images", "questions", pixels=blank),
    Condition("recall", "memory", "recalls", memory=own_episode),
    Condition("recall", "no memory", "recalls"),
    Condition("recall", "empty memory", "recalls", memory=empty_memory),
    Condition("recall", "another episode's memory", "recalls", memory=other_episode),
    Condition("recall", "after forgetting the asked image", "recalls", memory=forgotten_memory),
    Condition(
        "recall",
        "after editing",
        "recall edits",
        memory=edited_memory,
        scored=(
            ("after editing: the new image's answer", "edited answer"),
            ("after editing: the old image's answer", "answer"),
        ),
    ),
    Condition("recall", "after another episode is written on top", "recalls", memory=overwritten_memory),
    Condition("recall", "asked image in context (upper bound)", "asked images"),
)


def scored_keys(section: str) -> list[str]:
    """The result keys of `section`'s conditions, in table order (e.g. the rows of the report's recall table)."""
    return [key for condition in CONDITIONS if condition.section == section for key, _ in condition.scores]


def batches(rows: list[dict], size: int, description: str):
    # Bars only on a terminal (tqdm's disable=None), and never when transformers' bars are off
    # (`transformers.utils.logging.disable_progress_bar()`, HF_HUB_DISABLE_PROGRESS_BARS); TQDM_DISABLE=1 also works.
    disable = None if is_progress_bar_enabled() else True
    for start in tqdm(range(0, len(rows), size), desc=description, leave=False, disable=disable):
        yield rows[start : start + size]


@torch.no_grad()
def answers(ctx: EvalContext, condition: Condition, rows: list[dict]) -> list[str]:
    """Greedy answers (new tokens only, decoded and stripped) to `rows` under `condition`."""
    collator = MicroVLMCollator(ctx.processor, with_episodes=condition.with_episodes, prompts_only=True)
    outputs = []
    for chunk in batches(rows, ctx.args.batch_size, f"{condition.section}, {condition.name}"):
        batch = collator(chunk)
        if condition.pixels is not None and "pixel_values" in batch:
            batch["pixel_values"] = condition.pixels(batch["pixel_values"])
        inputs = condition.memory(ctx, batch, chunk)
        tokens = ctx.model.generate(**inputs, max_new_tokens=ctx.args.max_new_tokens, do_sample=False)
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
        outputs += [text.strip() for text in ctx.processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs


def asked_image_question(row: dict) -> dict:
    """The recall question turned into a question about the asked image, with that image in the input: what
    perception alone allows, an upper bound for recall through memory."""
    image = row["episode_images"][row["target_index"]]
    return {"kind": "qa", "image": image, "text": QUESTIONS[row["asked"]], "answer": row["answer"]}


def with_edit(row: dict, index: int, seed: int) -> dict:
    """A recall row carrying its edited episode (`edited_recall_sample`) and that episode's answer."""
    edited = edited_recall_sample(row, index, seed)
    return {**row, "edited": edited, "edited answer": edited["answer"]}


# ---------------------------------------------------------------------------------------------- scores


def attribute_accuracy(predictions: list[str], rows: list[dict]) -> dict[str, float]:
    parsed = [parse_attributes(p) for p in predictions]
    count = max(len(rows), 1)
    result = {name: sum(p[name] == r[name] for p, r in zip(parsed, rows)) / count for name in ATTRIBUTES}
    result["all"] = sum(all(p[n] == r[n] for n in ATTRIBUTES) for p, r in zip(parsed, rows)) / count
    result["mean"] = sum(result[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    return result


def exact_match(predictions: list[str], references: list[str]) -> float:
    return load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]


def chance_of_answers(rows: list[dict]) -> float:
    """Exact match of uniform guesses over the asked attribute's values."""
    return sum(1 / ATTRIBUTES[r["asked"]] for r in rows) / max(len(rows), 1)


def caption_scores(predictions: list[str], captions: list[dict]) -> dict[str, Any]:
    references = [[r["text"]] for r in captions]
    seen = [i for i, r in enumerate(captions) if not r["held_out"]]
    held_out = [i for i, r in enumerate(captions) if r["held_out"]]
    return {
        **caption_metrics(predictions, references),
        "attributes": attribute_accuracy(predictions, captions),
        "attributes_seen_pairs": attribute_accuracy([predictions[i] for i in seen], [captions[i] for i in seen]),
        "attributes_held_out_pairs": attribute_accuracy(
            [predictions[i] for i in held_out], [captions[i] for i in held_out]
        ),
    }


def exact_match_by(predictions: list[str], rows: list[dict], key: str, values) -> dict[Any, float]:
    """Exact match over the rows whose `key` equals each of `values` (values no row has are left out)."""
    return {
        value: exact_match(
            [p for p, r in zip(predictions, rows) if r[key] == value], [r["answer"] for r in rows if r[key] == value]
        )
        for value in values
        if any(r[key] == value for r in rows)
    }


@torch.no_grad()
def perplexity(ctx: EvalContext, rows: list[dict]) -> float:
    collator = MicroVLMCollator(ctx.processor)
    total, count = 0.0, 0
    for chunk in batches(rows, ctx.args.batch_size, "perplexity"):
        batch = collator(chunk)
        batch.pop("scope_targets")
        out = ctx.model(**batch, use_memory=False)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(out.lm_loss) * tokens, count + tokens
    return math.exp(total / max(count, 1))


@torch.no_grad()
def retrieval_similarity(model, processor, rows: list[dict]) -> torch.Tensor:
    """(N, N) cosine similarity of each row's image (y) with each row's text (x), from the alignment head."""
    batch = MicroVLMCollator(processor)(rows)
    images, texts = model.embed_images_and_texts(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return images @ texts.T


def retrieval_recall(similarity: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """Recall@k of `retrieval_similarity`, every row with the same caption counting as right."""
    captions = [r["text"] for r in rows]
    return recall_from_similarity(similarity, torch.tensor([[a == b for b in captions] for a in captions]))


@torch.no_grad()
def scope_decisions(ctx: EvalContext, rows: list[dict]) -> dict[str, float]:
    """ScopeNet's decisions at inference: the fraction of recall rows it lets read the memory and of caption/qa
    rows it keeps away from it (gate >= `scope_threshold`), reading the `written` memory."""
    collator = MicroVLMCollator(ctx.processor, prompts_only=True)
    opened = {"recall": [], "other": []}
    for chunk in batches(rows, ctx.args.batch_size, "scope decisions"):
        gate = ctx.model(**prompts(collator(chunk)), use_memory=True, memory_state=ctx.written).scope_gate
        for row, value in zip(chunk, (gate >= ctx.model.config.scope_threshold).tolist()):
            opened["recall" if row["kind"] == "recall" else "other"].append(value)
    on, off = sum(opened["recall"]), len(opened["other"]) - sum(opened["other"])
    return {
        "recall rows on": on / max(len(opened["recall"]), 1),
        "caption/qa rows off": off / max(len(opened["other"]), 1),
        "accuracy": (on + off) / max(len(rows), 1),
    }


def capacity_curve(ctx: EvalContext) -> dict[str, float]:
    """Recall with the memory on episodes of each of `capacity_episode_sizes` images."""
    curve = {}
    own = Condition("recall", "capacity", "capacity", memory=own_episode)
    for size in ctx.args.capacity_episode_sizes:
        rows = list(
            build_synthetic_dataset(
                0,
                0,
                ctx.args.capacity_samples,
                episode_size=size,
                seed=ctx.args.seed + size,
                image_size=ctx.model.config.vision_config.image_size,
                kinds=("recall",),
            )["test"]
        )
        curve[str(size)] = exact_match(answers(ctx, own, rows), [r["answer"] for r in rows])
    return curve


# ---------------------------------------------------------------------------------------------- analysis


@torch.no_grad()
def embedding_analysis(ctx: EvalContext, rows: list[dict]) -> dict[str, Any]:
    model, args = ctx.model, ctx.args
    batch = MicroVLMCollator(ctx.processor)(rows)
    images, texts = model.embed_images_and_texts(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    prefix = model.model.get_image_features(batch["pixel_values"]).prefix.mean(1)
    results = {}
    for name, embeddings in (("projected_cls", images), ("pooled_prefix", prefix), ("mean_text", texts)):
        n, dim = embeddings.shape
        results[name] = {
            "statistic": sliced_epps_pulley(embeddings, args.num_slices, args.seed),
            "null": epps_pulley_null(n, dim, args.num_slices, seed=args.seed),
            "n": n,
            "dim": dim,
        }
    with eager_language_attention(model):
        attentions = model(**prompts(batch), output_attentions=True, use_memory=False).attentions
    prefix_columns = batch["input_ids"][0] == model.config.image_token_id
    text_rows = text_token_mask(batch["input_ids"], model.config.image_token_id, batch["attention_mask"])
    weights = torch.stack(attentions).mean(2)[:, :, :, prefix_columns]  # (layers, B, T, k)
    results["prefix_attention"] = attention_stats(weights.permute(1, 2, 0, 3)[text_rows])
    return results


@torch.no_grad()
def vision_probe(ctx: EvalContext, rows: list[dict]) -> dict[str, Any]:
    """Linear-probe accuracy of each attribute from (a) the vision tower's pooled output (B, Dv): its CLS token, or
    the mean of its patch tokens without one, and (b) the adapter's prefix tokens flattened (B, k·D): what the
    image encoder makes linearly readable, before and after the adapter. `analysis.linear_probe` trains on the
    first half of `rows`, tests on the second."""
    features: dict[str, list[torch.Tensor]] = {"pooled_vision": [], "prefix": []}
    collator = MicroVLMCollator(ctx.processor)
    for chunk in batches(rows, ctx.args.batch_size, "vision probe"):
        image = ctx.model.model.get_image_features(collator(chunk)["pixel_values"])
        features["pooled_vision"].append(image.cls)
        features["prefix"].append(image.prefix.flatten(1))
    vocabularies = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNTS), "position": list(POSITIONS)}
    labels = {
        name: torch.tensor([vocabulary.index(r[name]) for r in rows]) for name, vocabulary in vocabularies.items()
    }
    result: dict[str, Any] = {
        "rows_train": len(rows) // 2,
        "rows_test": len(rows) - len(rows) // 2,
        "chance": {name: 1 / len(vocabulary) for name, vocabulary in vocabularies.items()},
    }
    for source, chunks in features.items():
        stacked = torch.cat(chunks).float()
        result[source] = {name: linear_probe(stacked, labels[name], len(vocabularies[name])) for name in vocabularies}
    return result


@torch.no_grad()
def memory_slot_usage(ctx: EvalContext, rows: list[dict]) -> dict[str, float]:
    batch = MicroVLMCollator(ctx.processor, with_episodes=True)(rows[: ctx.args.batch_size])
    return slot_utilisation(ctx.model.memory_addresses(**episodes(batch)))


# ---------------------------------------------------------------------------------------------- the evaluation


def test_rows(ctx: EvalContext) -> dict[str, list[dict]]:
    """The row sets the conditions name: the test split's captions, questions and recall questions, the recall
    questions with their edited episodes, and the asked images as questions."""
    size = ctx.model.config.vision_config.image_size
    args = ctx.args
    rows = list(
        build_synthetic_dataset(0, 0, args.num_test, image_size=size, episode_size=args.episode_size, seed=args.seed)[
            "test"
        ]
    )
    recalls = [r for r in rows if r["kind"] == "recall"]
    return {
        "all": rows,
        "captions": [r for r in rows if r["kind"] == "caption"],
        "questions": [r for r in rows if r["kind"] == "qa"],
        "recalls": recalls,
        "recall edits": [with_edit(row, index, args.seed) for index, row in enumerate(recalls)],
        "asked images": [asked_image_question(r) for r in recalls],
    }


def load_context(args: EvalArguments) -> EvalContext:
    """The saved model and processor (through the Auto classes, as a user loads them), the arguments with the
    episode size resolved, and the memories the conditions read."""
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir, trust_remote_code=True)
    args = replace(args, episode_size=args.episode_size or model.config.memory_episode_size)
    model.reset_memory()
    return EvalContext(model, processor, args, empty=model.memory_state)


def evaluate_model(ctx: EvalContext, row_sets: dict[str, list[dict]]) -> EvalResults:
    model, args = ctx.model, ctx.args
    captions, questions, recalls = row_sets["captions"], row_sets["questions"], row_sets["recalls"]
    # A written memory for the rows that should not use it (ScopeNet must keep them away): the first recall episode.
    first = MicroVLMCollator(ctx.processor, with_episodes=True)(recalls[:1])
    ctx.written = model.write_episodes(**episodes(first))
    predictions = {(c.section, c.name): answers(ctx, c, row_sets[c.rows]) for c in CONDITIONS}
    scored: dict[str, dict[str, Any]] = {"qa": {}, "recall": {}}
    for condition in CONDITIONS:
        if condition.section in scored:
            rows, generated = row_sets[condition.rows], predictions[condition.section, condition.name]
            for key, reference in condition.scores:
                scored[condition.section][key] = exact_match(generated, [row[reference] for row in rows])

    caption_results = {
        c.name: caption_scores(predictions[c.section, c.name], captions) for c in CONDITIONS if c.section == "captions"
    }
    chance = {**{n: 1 / k for n, k in ATTRIBUTES.items()}, "all": 1 / math.prod(ATTRIBUTES.values())}
    caption_results["chance"] = {"attributes": chance}
    generated = predictions["captions", "model"]
    caption_results["examples"] = [
        {"reference": r["text"], "generated": p} for r, p in zip(captions[:8], generated[:8])
    ]

    # Question accuracy by asked attribute on seen and on held-out colour–shape pairs: a shape right in answers
    # but wrong in captions is the caption's colour word, not the image, deciding the shape.
    answered = predictions["qa", "model"]
    by_pairs = {
        f"by_attribute_{name}": exact_match_by(
            [p for p, r in zip(answered, questions) if r["held_out"] == held],
            [r for r in questions if r["held_out"] == held],
            "asked",
            ATTRIBUTES,
        )
        for name, held in (("seen_pairs", False), ("held_out_pairs", True))
    }

    candidates = captions[: args.num_retrieval]
    chances = {"r@1": 1 / len(candidates), "r@5": 5 / len(candidates)}
    recall_at_k = retrieval_recall(retrieval_similarity(model, ctx.processor, candidates), candidates)

    with_memory = predictions["recall", "memory"]
    recall = {
        **scored["recall"],
        "chance": chance_of_answers(recalls),
        "by_position": {
            str(index + 1): value
            for index, value in exact_match_by(with_memory, recalls, "target_index", range(args.episode_size)).items()
        },
        "by_attribute": exact_match_by(with_memory, recalls, "asked", ATTRIBUTES),
        "slots": model.config.memory_num_slots,
    }
    scope = scope_decisions(ctx, row_sets["all"])
    recall["capacity"] = capacity_curve(ctx)

    analysis = embedding_analysis(ctx, captions[: min(len(captions), 256)])
    analysis["vision_probe"] = vision_probe(ctx, captions + questions)
    analysis["memory_slots"] = memory_slot_usage(ctx, recalls)
    results = EvalResults(
        model_dir=args.model_dir,
        dataset="microvlm-synthetic-shapes",
        split="test",
        arguments=asdict(args),
        counts={"caption": len(captions), "qa": len(questions), "recall": len(recalls)},
        captions=caption_results,
        perplexity={"model": perplexity(ctx, captions), "chance": model.config.text_config.vocab_size},
        qa={**scored["qa"], **by_pairs, "chance": chance_of_answers(questions)},
        retrieval={"model": recall_at_k, "candidates": len(candidates), "chance": chances},
        recall=recall,
        scope=scope,
        real_photos=real_photo_captions(ctx),
        analysis=analysis,
    )
    results.headline = headline(results)
    return results


def real_photo_captions(ctx: EvalContext) -> dict[str, Any] | None:
    """A smoke test on real photos: generation must run; the tiny preset has no quality bar here. None when no
    photo package is installed."""
    photos = load_real_photos()
    if not photos:
        return None
    rows = [{"kind": "caption", "image": p["image"], "text": p["references"][0]} for p in photos]
    generated = answers(ctx, Condition("real photos", "model", "photos"), rows)
    return {
        **caption_metrics(generated, [p["references"] for p in photos]),
        "count": len(photos),
        "examples": [{"photo": p["name"], "generated": g} for p, g in zip(photos, generated)],
    }


def headline(results: EvalResults) -> list[HeadlineFigure]:
    """The figures of the model card's model-index, each with its baseline and chance level."""
    captions, qa, retrieval, recall = results.captions, results.qa, results.retrieval, results.recall
    attribute_chance = sum(captions["chance"]["attributes"][n] for n in ATTRIBUTES) / len(ATTRIBUTES)

    def held_out(name: str) -> float:
        return captions[name]["attributes_held_out_pairs"]["mean"]

    blank = "blank images"
    r_at_1, r_at_1_chance = retrieval["model"]["image_to_text_r@1"], retrieval["chance"]["r@1"]
    retrieval_name = f"image→text R@1 ({retrieval['candidates']} candidates)"
    return [
        HeadlineFigure(
            "captioning",
            "accuracy",
            "attribute accuracy, held-out pairs",
            held_out("model"),
            blank,
            held_out(blank),
            attribute_chance,
        ),
        HeadlineFigure(
            "captioning", "bleu", "BLEU-4", captions["model"]["bleu"], blank, captions[blank]["bleu"], None
        ),
        HeadlineFigure(
            "captioning", "cider", "CIDEr-D", captions["model"]["cider_d"], blank, captions[blank]["cider_d"], None
        ),
        HeadlineFigure(
            "question answering", "exact_match", "QA exact match", qa["model"], blank, qa[blank], qa["chance"]
        ),
        HeadlineFigure("retrieval", "recall", retrieval_name, r_at_1, "chance", r_at_1_chance, r_at_1_chance),
        HeadlineFigure(
            "episodic recall",
            "exact_match",
            "recall exact match",
            recall["memory"],
            "memory off",
            recall["no memory"],
            recall["chance"],
        ),
    ]


def evaluate_own_data(ctx: EvalContext) -> dict[str, Any]:
    """Scores on `--dataset` (at most `num_test` rows): generated captions or answers, and retrieval R@k among the
    first `num_retrieval` caption rows (see `own_data.py`). The JSON of `eval_results.json` for your own data."""
    args = ctx.args
    rows = load_rows(
        args.dataset,
        args.split,
        args.image_column,
        args.text_column,
        args.question_column,
        args.answer_column,
        args.num_test,
    )
    kind = rows[0]["kind"]
    generated = answers(ctx, Condition(kind, "model", args.dataset), rows)
    results: dict[str, Any] = {"dataset": args.dataset, "split": args.split, "count": len(rows)}
    if kind == "qa":
        results["qa"] = score_answers(generated, rows)
    else:
        results["captions"] = score_captions(generated, rows)
        candidates = rows[: args.num_retrieval]
        similarity = retrieval_similarity(ctx.model, ctx.processor, candidates)
        results["retrieval"] = {
            **recall_from_similarity(similarity, ks=(1, 5, 10)),
            "candidates": len(candidates),
        }
    results["examples"] = [{"input": r["text"], "generated": g} for r, g in zip(rows[:8], generated[:8])]
    return results


def main(argv: list[str] | None = None) -> EvalResults | dict[str, Any]:
    """The built-in evaluation (an `EvalResults`, report and plots), or with `--dataset` your own data's scores."""
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)
    output = Path(args.output_dir or Path(args.model_dir) / "eval")
    output.mkdir(parents=True, exist_ok=True)
    ctx = load_context(args)
    if args.dataset is not None:
        results = evaluate_own_data(ctx)
        (output / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
        logger.info("%s", json.dumps({k: v for k, v in results.items() if k != "examples"}))
        return results
    row_sets = test_rows(ctx)
    results = evaluate_model(ctx, row_sets)
    results.save(output / "eval_results.json")
    from .report import write_plots, write_report

    candidates = row_sets["captions"][: args.num_retrieval]
    similarity = retrieval_similarity(ctx.model, ctx.processor, candidates)
    plots = write_plots(
        output, args.model_dir, ctx.model, ctx.processor, row_sets["captions"], row_sets["recalls"], similarity
    )
    write_report(output / "report.md", results, plots)
    logger.info("report: %s", output / "report.md")
    return results
