"""Data: the built-in shapes set, other image–text sources, bad samples, the collator, the CC12M downloader."""

import http.server
import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from microvlm import MicroVLMProcessor
from microvlm.data.collator import IGNORE_INDEX, MicroVLMCollator
from microvlm.data.sources import SkipBadSamples, load_image_text_dataset
from microvlm.data.synthetic_shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    answer_for,
    build_synthetic_dataset,
    caption_for,
    edited_recall_sample,
    parse_attributes,
    render_image,
)

from .test_processor import image


@pytest.fixture(scope="module")
def shapes():
    return build_synthetic_dataset(
        num_train=300, num_validation=60, num_test=200, image_size=64, episode_size=3, seed=0
    )


def png_bytes(colour="red", size=(20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_built_in_set_is_deterministic_by_seed():
    a = build_synthetic_dataset(5, 0, 0, seed=1)["train"]
    b = build_synthetic_dataset(5, 0, 0, seed=1)["train"]
    c = build_synthetic_dataset(5, 0, 0, seed=2)["train"]
    a_rows = a.cast_column("image", a.features["image"].__class__(decode=False)).to_list()
    b_rows = b.cast_column("image", b.features["image"].__class__(decode=False)).to_list()
    c_rows = c.cast_column("image", c.features["image"].__class__(decode=False)).to_list()
    assert a_rows == b_rows and a_rows != c_rows


def test_held_out_pairs_only_in_evaluation_splits_and_every_value_in_train(shapes):
    pairs = {
        split: {(r["colour"], r["shape"]) for r in shapes[split].select_columns(["colour", "shape"])}
        for split in shapes
    }
    assert not pairs["train"] & set(HELD_OUT_PAIRS)
    assert pairs["test"] & set(HELD_OUT_PAIRS)
    assert {c for c, _ in pairs["train"]} == set(COLOURS) and {s for _, s in pairs["train"]} == set(SHAPES)


def test_captions_round_trip_and_recall_answers_describe_the_target_image(shapes):
    for row in shapes["train"].select(range(60)):
        attributes = {k: row[k] for k in ("colour", "shape", "count", "position")}
        assert parse_attributes(caption_for(attributes)) == attributes
        if row["kind"] != "caption":
            assert row["answer"] == answer_for(attributes, row["asked"])
        if row["kind"] == "recall":
            target = parse_attributes(row["episode_captions"][row["target_index"]])
            assert target == attributes
            assert str(row["target_index"] + 1) in row["text"] and row["image"] is None
        else:
            assert row["image"].size == (64, 64) and row["image"].mode == "RGB"


@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_shapes_have_the_named_colour(colour):
    image = np.asarray(render_image(colour, "square", 4, "centre", 64, np.random.default_rng(0)), dtype=float)
    centre = image[24:40, 24:40].reshape(-1, 3)
    saturated = centre[(centre.max(1) - centre.min(1)) > 60]  # shape pixels; backgrounds are near-grey
    nearest = min(COLOURS, key=lambda name: np.linalg.norm(saturated.mean(0) - np.array(COLOURS[name])))
    assert len(saturated) > 20 and nearest == colour


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_train": -1}, "num_train"),
        ({"image_size": 4}, "image_size"),
        ({"episode_size": 1}, "episode_size"),
        ({"kinds": ("poems",)}, "kinds"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_synthetic_dataset(**{"num_train": 1, "num_validation": 0, "num_test": 0, **kwargs})


def test_collator_labels_targets_only_and_gives_episodes_to_recall_rows_only(shapes):
    processor = MicroVLMProcessor.from_preset("tiny")
    collator = MicroVLMCollator(processor, with_episodes=True)
    samples = [shapes["train"][i] for i in range(9)]
    batch = collator(samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        labels = batch["labels"][row]
        target = tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True).strip()
        assert target == (sample["answer"] or sample["text"])
        recall = sample["kind"] == "recall"
        assert bool((batch["input_ids"][row] == processor.image_token_id).any()) != recall
        assert int(batch["episode_mask"][row].sum()) == (len(sample["episode_images"]) if recall else 0)
        assert int(batch["memory_target_step"][row]) == (sample["target_index"] if recall else IGNORE_INDEX)
        if recall:  # step i is image i with "image i+1: caption i"
            for step, caption in enumerate(sample["episode_captions"]):
                ids = batch["episode_input_ids"][row, step]
                text = tokenizer.decode(ids[ids != processor.image_token_id], skip_special_tokens=True).strip()
                assert text == f"image {step + 1}: {caption}"
        else:  # masked steps carry blank pixels
            assert not batch["episode_pixel_values"][row].any()
    assert batch["pixel_values"].shape[0] == sum(s["kind"] != "recall" for s in samples)
    assert batch["episode_pixel_values"].shape[:2] == batch["episode_input_ids"].shape[:2]
    assert torch.equal(batch["scope_targets"], torch.tensor([float(s["kind"] == "recall") for s in samples]))
    without_recall = collator([s for s in samples if s["kind"] != "recall"])
    assert "episode_input_ids" not in without_recall and "memory_target_step" not in without_recall


def test_an_edited_recall_sample_differs_in_the_asked_attribute_only_at_the_asked_image(shapes):
    for index, sample in enumerate(s for s in shapes["test"] if s["kind"] == "recall"):
        edited = edited_recall_sample(sample, index, seed=1)
        target, asked = sample["target_index"], sample["asked"]
        assert edited["answer"] != sample["answer"] and edited["answer"] == answer_for(edited, asked)
        assert edited["episode_captions"][target] == caption_for(edited)
        others = [i for i in range(len(sample["episode_captions"])) if i != target]
        assert [edited["episode_captions"][i] for i in others] == [sample["episode_captions"][i] for i in others]
        assert edited == edited_recall_sample(sample, index, seed=1)  # deterministic
        if index == 20:
            break


def test_image_folder_with_jsonl_or_csv_and_missing_columns(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes())
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "caption": "one"}\n{"file_name": "b.png", "caption": "two"}\n'
    )
    dataset = load_image_text_dataset(str(tmp_path), text_column="caption")
    assert sorted(dataset["text"]) == ["one", "two"] and dataset[0]["image"].size == (20, 16)
    with pytest.raises(ValueError, match="no column 'text'.*caption"):
        load_image_text_dataset(str(tmp_path))
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,three\nb.png,four\n")
    assert sorted(load_image_text_dataset(str(tmp_path))["text"]) == ["four", "three"]


def test_webdataset_shards_load_with_their_captions(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key, caption in (("000", "red square"), ("001", "blue circle")):
            for suffix, data in ((".png", png_bytes()), (".txt", caption.encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset = load_image_text_dataset(str(tmp_path))
    assert sorted(dataset["text"]) == ["blue circle", "red square"]
    assert dataset[0]["image"].size == (20, 16)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    import datasets

    rows = {
        "image": [
            {"bytes": png_bytes(), "path": None},
            {"bytes": b"not an image", "path": None},
            {"bytes": png_bytes(), "path": None},
        ],
        "text": ["good", "broken", ""],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    safe = SkipBadSamples(dataset)
    served = [safe[i]["text"] for i in range(len(safe))]
    assert served == ["good", "good", "good"]  # broken → next good one (cyclic), empty text → next good one
    assert safe.skipped == {"undecodable image (UnidentifiedImageError)": 1, "empty text": 2}


class _Server(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path.startswith("/img"):
            body, kind = png_bytes("blue", (32, 24)), "image/png"
        elif self.path == "/html":
            body, kind = b"<html>not an image</html>", "text/html"
        elif self.path == "/slow":
            time.sleep(2.5)
            body, kind = png_bytes(), "image/png"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow
def test_cc12m_download_against_a_local_server_counts_failures_and_resumes(tmp_path):
    pytest.importorskip("img2dataset")
    from microvlm.data.cc12m import download_cc12m

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        lines = [f"{base}/img{i}.png\tblue picture {i}" for i in range(5)]
        lines += [
            f"{base}/missing.png\tmissing",
            f"{base}/html\tan html page",
            f"{base}/slow\tslow",
            "http://127.0.0.1:9/refused.png\trefused",
            f"{base}/img9.png\tbeyond the test samples",
        ]
        (tmp_path / "cc12m.tsv").write_text("\n".join(lines) + "\n")
        stats = download_cc12m(
            tmp_path / "cc12m.tsv", tmp_path / "out", workers=1, threads=4, timeout=1, retries=0, test_samples=9
        )
        assert stats["total"] == 9 and stats["ok"] == 5 and sum(stats["failed"].values()) == 4
        reasons = " ".join(stats["failed"]).lower()
        assert "404" in reasons and "timed out" in reasons and "refused" in reasons and "decod" in reasons
        assert json.loads((tmp_path / "out" / "_meta" / "stats.json").read_text()) == stats
        dataset = load_image_text_dataset(str(tmp_path / "out"))
        assert sorted(dataset["text"]) == [f"blue picture {i}" for i in range(5)]
        hits = len(_Server.hits)
        download_cc12m(
            tmp_path / "cc12m.tsv", tmp_path / "out", workers=1, threads=4, timeout=1, retries=0, test_samples=9
        )
        assert len(_Server.hits) == hits  # resumed: nothing fetched again
    finally:
        server.shutdown()


def test_processor_suffix_builds_the_built_in_collators_batch(processor):
    """(image, prompt, target) rows through the processor: the same ids and labels as the training collator."""
    samples = [
        {"kind": "qa", "image": image("red"), "text": "what colour are the shapes?", "answer": "red"},
        {"kind": "caption", "image": image("blue"), "text": "two blue circles on the left"},
    ]
    expected = MicroVLMCollator(processor)(samples)
    batch = processor(
        images=[s["image"] for s in samples],
        text=["what colour are the shapes?", ""],
        suffix=["red", "two blue circles on the left"],
    )
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(batch[key], expected[key]), key
