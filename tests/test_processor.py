"""MicroVLMProcessor: placeholder expansion, pixel values against a hand-made reference, every input kind, bad
inputs, save/load and remote-code round trips, labelled batches (`suffix`, `MicroVLMDataCollator`), processing
kwargs, chat stops. Also run under the lowest supported transformers (min_version)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from microvlm.processing_microvlm import MicroVLMDataCollator

from .test_remote_code import run_isolated


pytestmark = pytest.mark.min_version

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def picture(width=80, height=50) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_pixels(image: Image.Image, size: int = 64) -> torch.Tensor:
    """Independent DeiT-style preprocessing: bicubic resize to size², rescale to [0, 1], ImageNet normalise."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return torch.tensor(((array - MEAN) / STD).transpose(2, 0, 1), dtype=torch.float32)


def test_placeholders_expand_and_a_text_without_one_gets_the_prefix(processor):
    batch = processor(images=[picture(), picture()], text=["a <image> b", "c"])
    ids, k = batch["input_ids"], processor.num_image_tokens
    assert (ids == processor.image_token_id).sum(1).tolist() == [k, k]
    real = batch["attention_mask"][1] == 1
    assert ids[1][real][:k].eq(processor.image_token_id).all()  # prefix design: the image comes first
    row0 = ids[0][batch["attention_mask"][0] == 1].tolist()
    start = row0.index(processor.image_token_id)
    assert row0[start : start + k] == [processor.image_token_id] * k and start > 0  # in place, after "a"


def test_batches_are_left_padded(processor):
    batch = processor(text=["one", "two red circles on the left"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["attention_mask"][1].all()


def test_pixel_values_match_an_independent_reference(processor):
    image = picture()
    pixels = processor(images=[image], text=[""])["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    torch.testing.assert_close(pixels[0], reference_pixels(image), atol=2e-2, rtol=0)


def test_every_accepted_input_kind_gives_the_same_pixels(processor, tmp_path):
    image = picture()
    path = tmp_path / "picture.png"
    image.save(path)
    array = np.asarray(image)
    kinds = [image, str(path), path, array, array.astype(np.float32) / 255.0, image.convert("RGBA")]
    pixels = [processor(images=[kind], text=["x"])["pixel_values"] for kind in kinds]
    for index, other in enumerate(pixels[1:], start=1):
        torch.testing.assert_close(other, pixels[0], atol=1e-2, rtol=0, msg=f"input kind {index}")


def test_grayscale_and_transparent_images_become_rgb(processor):
    grey = processor(images=[Image.new("L", (30, 20), 128)], text=[""])["pixel_values"]
    assert grey.shape == (1, 3, 64, 64) and torch.allclose(grey[0, 0], grey[0, 1], atol=0.2)
    clear = processor(images=[Image.new("RGBA", (30, 20), (255, 0, 0, 0))], text=[""])["pixel_values"]
    white = processor(images=[Image.new("RGB", (30, 20), "white")], text=[""])["pixel_values"]
    torch.testing.assert_close(clear, white)  # transparent pixels are composited on white


@pytest.mark.parametrize(
    ("images", "text", "message"),
    [
        (["/no/such/file.png"], ["x"], "cannot read '/no/such/file.png'"),
        ([np.zeros((0, 5, 3), np.uint8)], ["x"], "zero-size"),
        ([Image.new("RGB", (0, 0))], ["x"], "zero-size"),
        ([42], ["x"], "got int"),
        ([np.zeros((4, 4, 5), np.uint8)], ["x"], r"got \(4, 4, 5\)"),
        ([picture(), picture()], ["x", "y", "z"], "2 images for 3 texts"),
        (None, ["<image> x"], "no image was given"),
        ([picture()], ["<image><image>"], "more than one"),
    ],
)
def test_bad_inputs_raise_value_errors_that_name_the_problem(processor, images, text, message):
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_unreadable_file_is_named(processor, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png"):
        processor(images=[bad], text=["x"])


def test_decode_round_trip_and_chat_template(processor):
    text = "two red circles on the left"
    ids = processor(text=[text])["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == [text]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "<|im_start|>user\n<image>what colour?<|im_end|>\n<|im_start|>assistant\n"
    batch = processor(images=[picture()], text=[prompt])
    assert (batch["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens


def test_save_and_remote_code_round_trip(processor, tmp_path):
    folder, elsewhere = tmp_path / "saved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    processor.save_pretrained(folder)
    image = picture()
    image.save(tmp_path / "picture.png")
    expected = processor(images=[image], text=["what shape?"])
    torch.save(dict(expected), tmp_path / "expected.pt")
    script = """
import sys, torch
sys.modules["microvlm"] = None
from transformers import AutoProcessor
folder, picture, expected = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "MicroVLMProcessor", type(processor)
got = processor(images=[picture], text=["what shape?"])
for key, value in torch.load(expected).items():
    assert torch.equal(got[key], value), key
"""
    run_isolated(script, str(folder), str(tmp_path / "picture.png"), str(tmp_path / "expected.pt"), cwd=elsewhere)


# ---------------------------------------------------------------- labelled batches, kwargs, chat (issue 12)


def image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def qa_rows(count: int = 4) -> list[dict]:
    colours = ["red", "blue", "green", "yellow"]
    return [
        {"image": image(colours[i % 4]), "prompt": "what colour are the shapes?", "completion": colours[i % 4]}
        for i in range(count)
    ]


def chat_rows(count: int = 4) -> list[dict]:
    colours = ["red", "blue", "green", "yellow"]
    return [
        {
            "images": [image(colours[i % 4])],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colours[i % 4]}]},
            ],
        }
        for i in range(count)
    ]


def test_data_collator_labels_only_the_answer_of_chat_and_prompt_completion_rows(processor):
    for rows in (qa_rows(2), chat_rows(2)):
        batch = MicroVLMDataCollator(processor)(rows)
        labelled = batch["labels"] != -100
        assert not labelled[batch["input_ids"] == processor.image_token_id].any()
        assert not labelled[batch["attention_mask"] == 0].any()
        answers = processor.tokenizer.batch_decode(
            [ids[mask] for ids, mask in zip(batch["input_ids"], labelled)], skip_special_tokens=True
        )
        assert [a.strip() for a in answers] == ["red", "blue"]
    with pytest.raises(ValueError, match="expected 'messages' or 'prompt'"):
        MicroVLMDataCollator(processor)([{"question": "q", "answer": "a", "image": image()}])


def test_processor_follows_processing_kwargs_and_takes_tensors(processor):
    plain = processor(images=[image()], text=["x"], do_normalize=False)["pixel_values"]
    assert plain.min() >= 0 and plain.max() <= 1
    nested = processor(images=[image()], text=["x"], images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.equal(plain, nested)
    padded = processor(images=[image()], text=["x"], text_kwargs={"padding": "max_length", "max_length": 20})
    assert padded["input_ids"].shape == (1, 20)
    tensor = torch.rand(3, 32, 32)
    from_tensor = processor(images=[tensor], text=["x"])["pixel_values"]
    from_array = processor(images=[(tensor.permute(1, 2, 0).numpy())], text=["x"])["pixel_values"]
    assert torch.equal(from_tensor, from_array)
    with pytest.raises(ValueError, match="raise max_length above 8"):
        processor(images=[image()], text=["hello there"], truncation=True, max_length=5)


def test_chat_generation_stops_at_the_turn_end(tiny_model, processor, tmp_path):
    turn_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tiny_model.save_pretrained(tmp_path)
    assert turn_end in GenerationConfig.from_pretrained(tmp_path).eos_token_id
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image()], text=[prompt])
    # A model that ends its turn at once: the reply must stop there, not run on to max_new_tokens.
    out = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, sequence_bias={(turn_end,): 100.0})
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == [turn_end]
