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
  (CLS, or mean of patch tokens) and on the adapter's flattened prefix, trained on one half of the test images, scored on the other.
* analysis: sliced Epps–Pulley (LeJEPA) of projected CLS, pooled prefix and mean text embeddings beside a
  Monte-Carlo null; attention entropy and sparsity over the prefix tokens; memory slot utilisation.
"""

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor, HfArgumentParser

from .analysis import (
    attention_stats,
    epps_pulley_null,
    linear_probe,
    recall_from_similarity,
    slot_utilisation,
    sliced_epps_pulley,
)
from .data.collator import MicroVLMCollator
from .data.real_photos import load_real_photos
from .data.synthetic_shapes import (
    COLOURS,
    COUNTS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    build_synthetic_dataset,
    edited_recall_sample,
    parse_attributes,
)
from .metrics import caption_metrics, load_metric
from .visualisation import eager_language_attention

logger = logging.getLogger("microvlm.eval")
ATTRIBUTES = {"colour": len(COLOURS), "shape": len(SHAPES), "count": len(COUNTS), "position": len(POSITIONS)}


@dataclass
class EvalArguments:
    model_dir: str = field(metadata={"help": "a saved MicroVLM folder (weights, config, processor, remote code)"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where to write the report (default: <model_dir>/eval)"}
    )
    num_test: int = 600
    num_retrieval: int = 100
    episode_size: int = 4
    capacity_episode_sizes: str = "2,4,8,16"
    capacity_samples: int = 60
    batch_size: int = 32
    max_new_tokens: int = 12
    seed: int = 42
    num_slices: int = 256


def batches(rows: list[dict], size: int, description: str):
    for start in tqdm(range(0, len(rows), size), desc=description, leave=False):
        yield rows[start : start + size]


@torch.no_grad()
def generate(
    model,
    processor,
    rows: list[dict],
    args: EvalArguments,
    description: str,
    with_episodes: bool = False,
    pixels=None,
    episodes=None,
    **generate_kwargs,
) -> list[str]:
    """Greedy answers for `rows`. `pixels(batch)` / `episodes(batch)` may alter the inputs (baselines)."""
    collator = MicroVLMCollator(processor, with_episodes=with_episodes, prompts_only=True)
    outputs = []
    for chunk in batches(rows, args.batch_size, description):
        batch = collator(chunk)
        batch.pop("labels"), batch.pop("scope_labels"), batch.pop("memory_target_step", None)
        if pixels is not None and "pixel_values" in batch:
            batch["pixel_values"] = pixels(batch["pixel_values"])
        if episodes is not None:
            batch = episodes(batch)
        outputs += greedy_answers(model, processor, batch, args, **generate_kwargs)
    return outputs


def greedy_answers(model, processor, batch: dict, args: EvalArguments, **generate_kwargs) -> list[str]:
    """Greedy continuations of a prompts-only `batch`: the new tokens only, decoded and stripped."""
    tokens = model.generate(**batch, **generate_kwargs, max_new_tokens=args.max_new_tokens, do_sample=False)
    return [
        text.strip()
        for text in processor.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def blank(pixels: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(pixels)


def shuffled(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.roll(1, dims=0)


def attribute_accuracy(predictions: list[str], rows: list[dict]) -> dict[str, float]:
    parsed = [parse_attributes(p) for p in predictions]
    result = {name: sum(p[name] == r[name] for p, r in zip(parsed, rows)) / max(len(rows), 1) for name in ATTRIBUTES}
    result["all"] = sum(all(p[n] == r[n] for n in ATTRIBUTES) for p, r in zip(parsed, rows)) / max(len(rows), 1)
    result["mean"] = sum(result[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    return result


def exact_match(predictions: list[str], references: list[str]) -> float:
    return load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]


@torch.no_grad()
def perplexity(model, processor, rows: list[dict], args: EvalArguments) -> float:
    collator = MicroVLMCollator(processor)
    total, count = 0.0, 0
    for chunk in batches(rows, args.batch_size, "perplexity"):
        batch = collator(chunk)
        batch.pop("scope_labels")
        out = model(**batch, use_memory=False)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(out.lm_loss) * tokens, count + tokens
    return math.exp(total / max(count, 1))


@torch.no_grad()
def retrieval(model, processor, rows: list[dict]) -> tuple[dict[str, float], torch.Tensor]:
    collator = MicroVLMCollator(processor)
    batch = collator(rows)
    images, texts = model.embed_images_and_texts(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    similarity = images @ texts.T
    captions = [r["text"] for r in rows]
    correct = torch.tensor([[a == b for b in captions] for a in captions])
    return recall_from_similarity(similarity, correct), similarity


def other_episode(batch: dict) -> dict:
    """Control: each row reads the memory written from the next row's episode."""
    for key in ("episode_input_ids", "episode_attention_mask", "episode_pixel_values", "episode_mask"):
        batch[key] = batch[key].roll(1, dims=0)
    return batch


@torch.no_grad()
def recall_after_memory_edits(model, processor, rows: list[dict], args: EvalArguments) -> dict[str, list[str]]:
    """Answers to each row's question after its episode is written and then changed, through the model's memory
    API (`write_episodes`):

    * "after forgetting the asked image": the asked step written again with weight −1;
    * "after editing": the asked step forgotten, then a different image (`edited_recall_sample`, differing in the
      asked attribute) written in its place;
    * "after another episode is written on top": the next row's episode written over it.
    """
    collator = MicroVLMCollator(processor, with_episodes=True, prompts_only=True)
    edited_rows = [edited_recall_sample(row, index, args.seed) for index, row in enumerate(rows)]
    outputs: dict[str, list[str]] = {
        "after forgetting the asked image": [],
        "after editing": [],
        "after another episode is written on top": [],
    }
    for chunk in batches(list(zip(rows, edited_rows)), args.batch_size, "recall after memory edits"):
        batch, edited = collator([row for row, _ in chunk]), collator([row for _, row in chunk])
        episode = [batch[k] for k in ("episode_input_ids", "episode_attention_mask", "episode_pixel_values")]
        replacement = [edited[k] for k in ("episode_input_ids", "episode_attention_mask", "episode_pixel_values")]
        steps = batch["episode_mask"]
        asked = torch.nn.functional.one_hot(batch["memory_target_step"], steps.shape[1]).to(steps.dtype) * steps
        state = model.write_episodes(*episode, steps)
        forgotten = model.write_episodes(*episode, asked, weight=-1.0, memory_state=state)
        states = {
            "after forgetting the asked image": forgotten,
            "after editing": model.write_episodes(*replacement, asked, memory_state=forgotten),
            "after another episode is written on top": model.write_episodes(
                *(t.roll(1, dims=0) for t in episode), steps.roll(1, dims=0), memory_state=state
            ),
        }
        prompts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        for name, memory_state in states.items():
            outputs[name] += greedy_answers(
                model, processor, prompts, args, use_memory=True, memory_state=memory_state
            )
    outputs["edited answers"] = [row["answer"] for row in edited_rows]
    return outputs


@torch.no_grad()
def scope_decisions(model, processor, rows: list[dict], args: EvalArguments, memory_state) -> dict[str, float]:
    """ScopeNet's decisions at inference: the fraction of recall rows it lets read the memory and of caption/qa
    rows it keeps away from it (gate >= `scope_threshold`), reading `memory_state`."""
    collator = MicroVLMCollator(processor, prompts_only=True)
    opened = {"recall": [], "other": []}
    for chunk in batches(rows, args.batch_size, "scope decisions"):
        batch = collator(chunk)
        batch.pop("labels"), batch.pop("scope_labels")
        gate = model(**batch, use_memory=True, memory_state=memory_state).scope_gate
        for row, value in zip(chunk, (gate >= model.config.scope_threshold).tolist()):
            opened["recall" if row["kind"] == "recall" else "other"].append(value)
    on, off = sum(opened["recall"]), len(opened["other"]) - sum(opened["other"])
    return {
        "recall rows on": on / max(len(opened["recall"]), 1),
        "caption/qa rows off": off / max(len(opened["other"]), 1),
        "accuracy": (on + off) / max(len(rows), 1),
    }


def asked_image_question(row: dict) -> dict:
    """The recall question turned into a question about the asked image, with that image in the input: what
    perception alone allows, an upper bound for recall through memory."""
    return {
        "kind": "qa",
        "image": row["episode_images"][row["target_index"]],
        "text": QUESTIONS[row["asked"]],
        "answer": row["answer"],
    }


@torch.no_grad()
def embedding_analysis(model, processor, rows: list[dict], args: EvalArguments) -> dict[str, Any]:
    collator = MicroVLMCollator(processor)
    batch = collator(rows)
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
        attentions = model(
            **{k: v for k, v in batch.items() if k not in ("labels", "scope_labels")},
            output_attentions=True,
            use_memory=False,
        ).attentions
    prefix_columns = batch["input_ids"][0] == model.config.image_token_id
    text_rows = (batch["input_ids"] != model.config.image_token_id) & batch["attention_mask"].bool()
    weights = torch.stack(attentions).mean(2)[:, :, :, prefix_columns]  # (layers, B, T, k)
    results["prefix_attention"] = attention_stats(weights.permute(1, 2, 0, 3)[text_rows])
    return results


@torch.no_grad()
def vision_probe(model, processor, rows: list[dict], args: EvalArguments) -> dict[str, Any]:
    """Linear-probe accuracy of each attribute from (a) the vision tower's pooled output (B, Dv): its CLS token, or
    the mean of its patch tokens without one, and (b) the adapter's prefix tokens flattened (B, k·D): what the
    image encoder makes linearly readable, before and after the adapter. `analysis.linear_probe` trains on the
    first half of `rows`, tests on the second."""
    features: dict[str, list[torch.Tensor]] = {"pooled_vision": [], "prefix": []}
    collator = MicroVLMCollator(processor)
    for chunk in batches(rows, args.batch_size, "vision probe"):
        image = model.model.get_image_features(collator(chunk)["pixel_values"])
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


def evaluate_model(args: EvalArguments) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir, trust_remote_code=True)
    size = model.config.vision_config.image_size
    test = build_synthetic_dataset(
        0, 0, args.num_test, image_size=size, episode_size=args.episode_size, seed=args.seed
    )["test"]
    rows = list(test)
    captions = [r for r in rows if r["kind"] == "caption"]
    questions = [r for r in rows if r["kind"] == "qa"]
    recalls = [r for r in rows if r["kind"] == "recall"]
    results: dict[str, Any] = {
        "model_dir": args.model_dir,
        "dataset": "microvlm-synthetic-shapes",
        "split": "test",
        "arguments": asdict(args),
        "counts": {"caption": len(captions), "qa": len(questions), "recall": len(recalls)},
    }
    # A written memory for the rows that should not use it (ScopeNet must keep them away): the first recall episode.
    first = MicroVLMCollator(processor, with_episodes=True)(recalls[:1])
    written = model.write_episodes(
        first["episode_input_ids"],
        first["episode_attention_mask"],
        first["episode_pixel_values"],
        first["episode_mask"],
    )

    predictions = {
        "model": generate(model, processor, captions, args, "captions", use_memory=False),
        "blank images": generate(model, processor, captions, args, "captions, blank", pixels=blank, use_memory=False),
        "shuffled images": generate(
            model, processor, captions, args, "captions, shuffled", pixels=shuffled, use_memory=False
        ),
        "memory on": generate(
            model, processor, captions, args, "captions, memory on", use_memory=True, memory_state=written
        ),
    }
    references = [[r["text"]] for r in captions]
    seen = [i for i, r in enumerate(captions) if not r["held_out"]]
    held_out = [i for i, r in enumerate(captions) if r["held_out"]]
    results["captions"] = {
        name: {
            **caption_metrics(preds, references),
            "attributes": attribute_accuracy(preds, captions),
            "attributes_seen_pairs": attribute_accuracy([preds[i] for i in seen], [captions[i] for i in seen]),
            "attributes_held_out_pairs": attribute_accuracy(
                [preds[i] for i in held_out], [captions[i] for i in held_out]
            ),
        }
        for name, preds in predictions.items()
    }
    results["captions"]["chance"] = {
        "attributes": {**{n: 1 / k for n, k in ATTRIBUTES.items()}, "all": 1 / math.prod(ATTRIBUTES.values())}
    }
    results["captions"]["examples"] = [
        {"reference": r["text"], "generated": p} for r, p in zip(captions[:8], predictions["model"][:8])
    ]
    results["perplexity"] = {
        "model": perplexity(model, processor, captions, args),
        "chance": model.config.text_config.vocab_size,
    }

    answers = [r["answer"] for r in questions]
    results["qa"] = {
        "model": exact_match(generate(model, processor, questions, args, "questions", use_memory=False), answers),
        "memory on": exact_match(
            generate(model, processor, questions, args, "questions, memory on", use_memory=True, memory_state=written),
            answers,
        ),
        "blank images": exact_match(
            generate(model, processor, questions, args, "questions, blank", pixels=blank, use_memory=False), answers
        ),
        "chance": sum(1 / ATTRIBUTES[r["asked"]] for r in questions) / max(len(questions), 1),
    }

    candidates = captions[: args.num_retrieval]
    recall_at_k, similarity = retrieval(model, processor, candidates)
    results["retrieval"] = {
        "model": recall_at_k,
        "candidates": len(candidates),
        "chance": {"r@1": 1 / len(candidates), "r@5": 5 / len(candidates)},
    }

    answers = [r["answer"] for r in recalls]
    with_memory = generate(model, processor, recalls, args, "recall, memory", with_episodes=True)
    edits = recall_after_memory_edits(model, processor, recalls, args)
    model.reset_memory()
    results["recall"] = {
        "memory": exact_match(with_memory, answers),
        "no memory": exact_match(
            generate(model, processor, recalls, args, "recall, no memory", use_memory=False), answers
        ),
        "empty memory": exact_match(
            generate(
                model, processor, recalls, args, "recall, empty", use_memory=True, memory_state=model.memory_state
            ),
            answers,
        ),
        "another episode's memory": exact_match(
            generate(
                model, processor, recalls, args, "recall, other episode", with_episodes=True, episodes=other_episode
            ),
            answers,
        ),
        "after forgetting the asked image": exact_match(edits["after forgetting the asked image"], answers),
        "after editing: the new image's answer": exact_match(edits["after editing"], edits["edited answers"]),
        "after editing: the old image's answer": exact_match(edits["after editing"], answers),
        "after another episode is written on top": exact_match(
            edits["after another episode is written on top"], answers
        ),
        "asked image in context (upper bound)": exact_match(
            generate(
                model,
                processor,
                [asked_image_question(r) for r in recalls],
                args,
                "recall, image in context",
                use_memory=False,
            ),
            answers,
        ),
        "chance": sum(1 / ATTRIBUTES[r["asked"]] for r in recalls) / max(len(recalls), 1),
        "by_position": {
            str(i + 1): exact_match(
                [p for p, r in zip(with_memory, recalls) if r["target_index"] == i],
                [r["answer"] for r in recalls if r["target_index"] == i],
            )
            for i in range(args.episode_size)
            if any(r["target_index"] == i for r in recalls)
        },
        "by_attribute": {
            name: exact_match(
                [p for p, r in zip(with_memory, recalls) if r["asked"] == name],
                [r["answer"] for r in recalls if r["asked"] == name],
            )
            for name in ATTRIBUTES
            if any(r["asked"] == name for r in recalls)
        },
        "slots": model.config.memory_num_slots,
    }
    results["scope"] = scope_decisions(model, processor, rows, args, written)
    results["recall"]["capacity"] = capacity_curve(model, processor, args)

    photos = load_real_photos()
    if photos:  # a smoke test on real photos: generation must run; the tiny preset has no quality bar here
        rows_ = [{"kind": "caption", "image": p["image"], "text": p["references"][0]} for p in photos]
        generated = generate(model, processor, rows_, args, "real photos", use_memory=False)
        results["real_photos"] = {
            **caption_metrics(generated, [p["references"] for p in photos]),
            "count": len(photos),
            "examples": [{"photo": p["name"], "generated": g} for p, g in zip(photos, generated)],
        }

    analysed = captions[: min(len(captions), 256)]
    results["analysis"] = embedding_analysis(model, processor, analysed, args)
    results["analysis"]["vision_probe"] = vision_probe(model, processor, captions + questions, args)
    results["analysis"]["memory_slots"] = memory_slot_usage(model, processor, recalls, args)
    results["headline"] = headline(results)
    return results, model, processor, captions, recalls, similarity


def capacity_curve(model, processor, args: EvalArguments) -> dict[str, float]:
    curve = {}
    for size in [int(s) for s in args.capacity_episode_sizes.split(",")]:
        rows = list(
            build_synthetic_dataset(
                0,
                0,
                args.capacity_samples,
                image_size=model.config.vision_config.image_size,
                episode_size=size,
                seed=args.seed + size,
                kinds=("recall",),
            )["test"]
        )
        sized = EvalArguments(**{**asdict(args), "episode_size": size})
        curve[str(size)] = exact_match(
            generate(model, processor, rows, sized, f"capacity {size}", with_episodes=True),
            [r["answer"] for r in rows],
        )
    return curve


@torch.no_grad()
def memory_slot_usage(model, processor, rows: list[dict], args: EvalArguments) -> dict[str, float]:
    batch = MicroVLMCollator(processor, with_episodes=True)(rows[: args.batch_size])
    return slot_utilisation(
        model.memory_addresses(
            batch["episode_input_ids"],
            batch["episode_attention_mask"],
            batch["episode_pixel_values"],
            batch["episode_mask"],
        )
    )


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures of the model card's model-index, each with its baseline and chance level."""
    captions, chance = results["captions"], results["captions"]["chance"]["attributes"]
    return [
        {
            "task": "captioning",
            "metric": "accuracy",
            "name": "attribute accuracy, held-out pairs",
            "value": captions["model"]["attributes_held_out_pairs"]["mean"],
            "baseline_name": "blank images",
            "baseline": captions["blank images"]["attributes_held_out_pairs"]["mean"],
            "chance": sum(chance[n] for n in ATTRIBUTES) / len(ATTRIBUTES),
        },
        {
            "task": "captioning",
            "metric": "bleu",
            "name": "BLEU-4",
            "value": captions["model"]["bleu"],
            "baseline_name": "blank images",
            "baseline": captions["blank images"]["bleu"],
            "chance": None,
        },
        {
            "task": "captioning",
            "metric": "cider",
            "name": "CIDEr-D",
            "value": captions["model"]["cider_d"],
            "baseline_name": "blank images",
            "baseline": captions["blank images"]["cider_d"],
            "chance": None,
        },
        {
            "task": "question answering",
            "metric": "exact_match",
            "name": "QA exact match",
            "value": results["qa"]["model"],
            "baseline_name": "blank images",
            "baseline": results["qa"]["blank images"],
            "chance": results["qa"]["chance"],
        },
        {
            "task": "retrieval",
            "metric": "recall",
            "name": f"image→text R@1 ({results['retrieval']['candidates']} candidates)",
            "value": results["retrieval"]["model"]["image_to_text_r@1"],
            "baseline_name": "chance",
            "baseline": results["retrieval"]["chance"]["r@1"],
            "chance": results["retrieval"]["chance"]["r@1"],
        },
        {
            "task": "episodic recall",
            "metric": "exact_match",
            "name": "recall exact match",
            "value": results["recall"]["memory"],
            "baseline_name": "memory off",
            "baseline": results["recall"]["no memory"],
            "chance": results["recall"]["chance"],
        },
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)
    output = Path(args.output_dir or Path(args.model_dir) / "eval")
    output.mkdir(parents=True, exist_ok=True)
    results, model, processor, captions, recalls, similarity = evaluate_model(args)
    (output / "eval_results.json").write_text(json.dumps(results, indent=2))
    from .report import write_plots, write_report

    plots = write_plots(output, args.model_dir, model, processor, captions, recalls, similarity)
    write_report(output / "report.md", results, plots)
    logger.info("report: %s", output / "report.md")
    return results


if __name__ == "__main__":
    main()
