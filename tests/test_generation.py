"""Generation: the cached decode must equal recomputing everything, batching must not change tokens, and the
image prefix must be computed once per `generate`. Run on the lowest supported transformers too (min_version)."""

import pytest
import torch

from .conftest import make_inputs


pytestmark = pytest.mark.min_version


def greedy_without_cache(model, input_ids, attention_mask, pixel_values, steps: int) -> torch.Tensor:
    """Reference decoder: the whole sequence (image included) is recomputed at every step, no cache. The memory
    (when on) is read from the prompt at every step, as `generate` reads it once from the prompt."""
    prompt = attention_mask
    for _ in range(steps):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            use_cache=False,
            memory_query_mask=prompt,
        ).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
        prompt = torch.cat([prompt, torch.zeros_like(next_token)], dim=1)
    return input_ids


def generate_greedy(model, inputs, steps):
    # min_new_tokens keeps the reference and generate equally long even if a random model emits EOS.
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


@torch.no_grad()
def test_greedy_generate_equals_a_no_cache_argmax_loop(family_model):
    inputs = make_inputs(family_model.config, [6, 3])
    generated = generate_greedy(family_model, inputs, 8)
    reference = greedy_without_cache(
        family_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 8
    )
    assert torch.equal(generated, reference)


@torch.no_grad()
def test_a_padded_batch_gives_each_row_the_tokens_it_gets_alone(tiny_model, tiny_config):
    lengths = [9, 2, 5]
    batch = make_inputs(tiny_config, lengths, seed=4)
    together = generate_greedy(tiny_model, batch, 6)[:, -6:]
    for row in range(len(lengths)):
        keep = batch["attention_mask"][row] == 1
        alone = {
            "input_ids": batch["input_ids"][row : row + 1, keep],
            "attention_mask": batch["attention_mask"][row : row + 1, keep],
            "pixel_values": batch["pixel_values"][row : row + 1],
        }
        assert torch.equal(generate_greedy(tiny_model, alone, 6)[0, -6:], together[row]), f"row {row}"


@torch.no_grad()
def test_the_image_prefix_is_computed_once_per_generate(tiny_model, tiny_config):
    calls = []
    hook = tiny_model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate_greedy(tiny_model, make_inputs(tiny_config, [4, 4]), 5)
    finally:
        hook.remove()
    assert len(calls) == 1


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, [4])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(
            tiny_model.generate(
                **inputs, max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95
            )
        )
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], generate_greedy(tiny_model, inputs, 12))
