"""The episodic memory inside the model: GQA-shaped key/values as past_key_values, gating, generation, state."""

import pytest
import torch

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.memory_cache import MemoryCache

from .conftest import make_inputs
from .test_generation import greedy_without_cache


pytestmark = pytest.mark.min_version


def build_memory_model(preset: str) -> MicroVLMForCausalLM:
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset, use_memory=True, scope_threshold=0.0)).eval()
    with torch.no_grad():  # a memory whose effect on the logits is large enough to see
        model.model.memory.projection.proj.weight.mul_(20)
    return model


@pytest.fixture
def memory_model() -> MicroVLMForCausalLM:
    return build_memory_model("tiny")


@pytest.fixture(params=["tiny", "tiny-m"])
def family_memory_model(request) -> MicroVLMForCausalLM:
    """`memory_model` for the small preset of each family (Qwen2-style LM, BitNet b1.58 LM)."""
    return build_memory_model(request.param)


def memory_kv_shapes(model, inputs) -> list[tuple[int, ...]]:
    embeds, _ = model.model.fused_embeddings(inputs["input_ids"], inputs["pixel_values"])
    read = model.model.memory.read(model.model.memory_codes(embeds, inputs["input_ids"], inputs["attention_mask"]))
    return [tuple(key.shape) for key, _ in read.key_values] + [tuple(value.shape) for _, value in read.key_values]


def test_memory_key_values_have_the_language_models_gqa_cache_shape(family_memory_model):
    memory_model = family_memory_model
    config = memory_model.config
    inputs = make_inputs(config, [4, 6])
    text = config.text_config
    expected = (
        2,
        text.num_key_value_heads,
        config.memory_tokens_per_read,
        text.hidden_size // text.num_attention_heads,
    )
    assert text.num_key_value_heads < text.num_attention_heads  # GQA: KV heads, not query heads
    assert memory_kv_shapes(memory_model, inputs) == [expected] * (2 * text.num_hidden_layers)
    with torch.no_grad():
        out = memory_model(**inputs, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, MemoryCache)
    assert len(cache.layers) == text.num_hidden_layers
    assert cache.get_seq_length() == config.memory_tokens_per_read + inputs["input_ids"].shape[1]
    # The LM's own cache without memory (BitNet's, Qwen2's) has the same layout: (batch, KV heads, tokens, dim).
    with torch.no_grad():
        own = memory_model(**inputs, use_cache=True, use_memory=False).past_key_values
    assert not isinstance(own, MemoryCache)
    for layer, own_layer in zip(cache.layers, own.layers):
        assert layer.keys.shape[:2] + layer.keys.shape[3:] == own_layer.keys.shape[:2] + own_layer.keys.shape[3:]
        assert layer.values.shape[2] == own_layer.values.shape[2] + config.memory_tokens_per_read


@torch.no_grad()
@pytest.mark.parametrize(
    ("preset", "layers", "kv_heads", "head_dim", "hidden"),
    [("microvlm-v", 24, 2, 64, 896), ("microvlm-m", 30, 5, 128, 2560)],
)
def test_reference_preset_memory_is_shaped_for_the_lms_kv_heads(preset, layers, kv_heads, head_dim, hidden):
    config = MicroVLMConfig.from_preset(preset)
    with torch.device("meta"):
        model = MicroVLMForCausalLM(config)
        key_values = model.model.memory.projection(torch.zeros(3, 1, config.memory_key_dim + 2 * hidden))
    assert len(key_values) == layers
    expected = (3, kv_heads, 1, head_dim)
    assert all(key.shape == expected and value.shape == expected for key, value in key_values)


@torch.no_grad()
def test_zero_projection_gives_zero_memory_key_values(memory_model):
    inputs = make_inputs(memory_model.config, [5, 3])
    without = memory_model(**inputs, use_memory=False).logits
    assert not torch.allclose(memory_model(**inputs, use_memory=True).logits, without, atol=1e-3)
    memory_model.model.memory.projection.proj.weight.zero_()
    memory_model.model.memory.projection.proj.bias.zero_()
    # A zeroed W_M gives all-zero memory keys and values. Under softmax attention a zero key still takes weight
    # exp(0)/Z, so this is not "no memory"; masking the memory columns is (next test).
    embeds, _ = memory_model.model.fused_embeddings(inputs["input_ids"], inputs["pixel_values"])
    read = memory_model.model.memory.read(
        memory_model.model.memory_codes(embeds, inputs["input_ids"], inputs["attention_mask"])
    )
    assert all(not key.any() and not value.any() for key, value in read.key_values)


@torch.no_grad()
def test_a_gated_off_row_gets_exactly_the_logits_without_memory(memory_model):
    inputs = make_inputs(memory_model.config, [5, 3])
    without = memory_model(**inputs, use_memory=False).logits
    memory_model.config.scope_threshold = 1.01  # every gate is below: no row reads the memory
    gated = memory_model(**inputs, use_memory=True)
    assert gated.scope_gate.shape == (2,)
    torch.testing.assert_close(gated.logits, without, rtol=0, atol=1e-6)


@torch.no_grad()
def test_generation_with_memory_equals_a_no_cache_loop_with_the_same_memory(family_memory_model):
    memory_model = family_memory_model
    inputs = make_inputs(memory_model.config, [6, 3])
    generated = memory_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_memory=True)
    reference = greedy_without_cache(
        memory_model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 6
    )
    assert torch.equal(generated, reference)  # the no-cache loop reads the memory at every step (config default)
    assert not torch.equal(
        generated,
        memory_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_memory=False),
    )


@torch.no_grad()
def test_the_memory_is_read_once_per_generate(memory_model):
    calls = []
    hook = memory_model.model.memory.projection.register_forward_hook(lambda *_: calls.append(1))
    try:
        memory_model.generate(
            **make_inputs(memory_model.config, [4]), max_new_tokens=5, min_new_tokens=5, use_memory=True
        )
    finally:
        hook.remove()
    assert len(calls) == 1


@torch.no_grad()
def test_written_memory_persists_across_generate_calls_until_reset(memory_model, tmp_path):
    config = memory_model.config
    episode = make_inputs(config, [5, 5, 5], seed=7)
    question = make_inputs(config, [4], seed=8)
    before = memory_model(**question).logits
    state = memory_model.write_memory(**episode)
    code_dim = config.memory_key_dim + 2 * config.text_config.hidden_size  # key + (image, text) value
    assert state.mean.shape == (1, config.memory_num_slots, code_dim)
    after = memory_model(**question).logits
    assert not torch.allclose(before, after)
    assert torch.equal(memory_model(**question).logits, after)  # reading does not change the memory
    memory_model.save_memory(tmp_path)
    memory_model.reset_memory()
    torch.testing.assert_close(memory_model(**question).logits, before)
    memory_model.load_memory(tmp_path)
    torch.testing.assert_close(memory_model(**question).logits, after)


def test_gradients_reach_the_projection_scope_net_lstm_and_prior_when_memory_is_on():
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", use_memory=True, memory_use_lstm=True)).train()
    inputs = make_inputs(model.config, [5, 5, 4, 6], seed=2)
    episode = make_inputs(model.config, [4] * 8, seed=3)
    out = model(
        **inputs,
        labels=inputs["input_ids"],
        episode_input_ids=episode["input_ids"].view(4, 2, -1),
        episode_attention_mask=episode["attention_mask"].view(4, 2, -1),
        episode_pixel_values=episode["pixel_values"].view(4, 2, 3, 64, 64),
        scope_targets=torch.tensor([1.0, 0.0, 1.0, 0.0]),
    )
    assert torch.isfinite(out.memory_kl) and torch.isfinite(out.addressing_kl) and out.scope_loss is not None
    out.loss.backward()
    for name in (
        "projection.proj.weight",
        "scope_net.net.0.weight",
        "larimar.lstm.weight_ih_l0",
        "larimar.prior_mean",
        "larimar.prior_log_variance",
        "larimar.addressing_log_variance",
    ):
        name = "model.memory." + name
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_gradient_checkpointing_with_memory_is_refused_clearly():
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", use_memory=True)).train()
    model.gradient_checkpointing_enable()
    inputs = make_inputs(model.config, [4])
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**inputs, labels=inputs["input_ids"])


@torch.no_grad()
def test_other_backbone_families_gpt2_lm_and_convolutional_tower_without_cls():
    """Sizes and families come from the config: a GPT-2-style LM (no GQA, `wte` embeddings, learned positions)
    and a ConvNeXt tower (4-D feature maps, no CLS token) run the same code, memory included."""
    config = MicroVLMConfig(
        vision_config={
            "model_type": "convnext",
            "image_size": 64,
            "hidden_sizes": [16, 32, 48, 64],
            "depths": [1, 1, 1, 1],
        },
        text_config={
            "model_type": "gpt2",
            "vocab_size": 2048,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        vision_num_patches=4,
        vision_cls_token=False,
        image_token_id=3,
        adapter_num_heads=4,
        memory_num_slots=16,
        use_memory=True,
    )
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.language_model.wte.weight
    inputs = make_inputs(config, [5, 3])
    assert memory_kv_shapes(model, inputs) == [(2, 4, 1, 16)] * 4
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(
        generated,
        greedy_without_cache(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 5),
    )


def episode_of(config, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """One episode of `steps` image+text steps for a batch of one row, shaped as `forward` takes it (1, E, ...)."""
    inputs = make_inputs(config, [4] * steps, seed=seed)
    return {
        "episode_input_ids": inputs["input_ids"].unsqueeze(0),
        "episode_attention_mask": inputs["attention_mask"].unsqueeze(0),
        "episode_pixel_values": inputs["pixel_values"].unsqueeze(0),
    }


@torch.no_grad()
def test_no_target_token_reaches_the_memory_read(memory_model):
    """Training reads the memory from the prompt (the tokens before the first label), as generate does: changing
    the target changes nothing the memory gives, so the prompt positions' logits stay the same."""
    config = memory_model.config
    inputs = make_inputs(config, [6, 6], seed=4)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the last 3 tokens are the target
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][:, -3:] = (other["input_ids"][:, -3:] + 7) % config.text_config.vocab_size
    episode = episode_of(config, 3, seed=5)
    episode = {k: v.expand(2, *v.shape[1:]) for k, v in episode.items()}
    prompt = slice(0, inputs["input_ids"].shape[1] - 3)
    first = memory_model(**inputs, labels=labels, **episode).logits[:, prompt]
    second = memory_model(**other, labels=labels, **episode).logits[:, prompt]
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    # Control: a read over the whole sequence (target included) does see the change.
    whole = memory_model(**other, labels=labels, memory_query_mask=other["attention_mask"], **episode).logits[
        :, prompt
    ]
    assert not torch.allclose(first, whole, atol=1e-4)
    # And the prompt read is what generate's first step computes.
    generate_step = memory_model(
        input_ids=inputs["input_ids"][:, prompt],
        attention_mask=inputs["attention_mask"][:, prompt],
        pixel_values=inputs["pixel_values"],
        **episode,
    ).logits
    torch.testing.assert_close(first, generate_step, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_forgetting_through_the_public_api_undoes_a_write_exactly(memory_model):
    config = memory_model.config
    kept, dropped = make_inputs(config, [4, 5], seed=9), make_inputs(config, [6], seed=10)
    expected = memory_model.write_memory(**kept)
    memory_model.write_memory(**dropped)
    state = memory_model.write_memory(**dropped, weight=-1.0)
    torch.testing.assert_close(state.mean, expected.mean, rtol=1e-2, atol=1e-2)
    # Batched episodes: forgetting step 1 of each row equals writing the episode without it.
    episode = {
        k: v.view(2, 2, *v.shape[1:])
        for k, v in {
            "episode_input_ids": make_inputs(config, [4] * 4, seed=11)["input_ids"],
            "episode_attention_mask": make_inputs(config, [4] * 4, seed=11)["attention_mask"],
            "episode_pixel_values": make_inputs(config, [4] * 4, seed=11)["pixel_values"],
        }.items()
    }
    full = memory_model.write_episodes(**episode)
    second_only = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    forgotten = memory_model.forget_episodes(full, **episode, episode_mask=1 - second_only)
    torch.testing.assert_close(
        forgotten.mean, memory_model.write_episodes(**episode, episode_mask=second_only).mean, rtol=1e-2, atol=1e-2
    )
    # Exact undo whatever was written in between: forgetting the first write after a second one leaves the second.
    other = {k: v.roll(1, dims=0) for k, v in episode.items()}
    both = memory_model.write_episodes(**other, memory_state=full)
    undone = memory_model.forget_episodes(both, **episode)
    torch.testing.assert_close(undone.mean, memory_model.write_episodes(**other).mean, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_padding_steps_are_neither_encoded_nor_written(memory_model):
    config = memory_model.config
    episode = episode_of(config, 3, seed=12)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    codes, weights = memory_model.model.episode_codes(*episode.values(), mask)
    assert torch.equal(weights, mask.T)
    assert not codes[2].any() and codes[:2].abs().sum() > 0
    alone, _ = memory_model.model.episode_codes(*(v[:, :2] for v in episode.values()))
    torch.testing.assert_close(codes[:2], alone)
    torch.testing.assert_close(
        memory_model.write_episodes(**episode, episode_mask=mask).mean,
        memory_model.write_episodes(**{k: v[:, :2] for k, v in episode.items()}).mean,
    )


def test_step_loss_is_the_cross_entropy_of_centred_key_cosines():
    torch.manual_seed(13)
    config = MicroVLMConfig.from_preset("tiny")
    memory = MicroVLMForCausalLM(config).model.memory
    steps, questions = torch.randn(3, 2, 192), torch.randn(2, 192)
    step_mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([2, 1])
    loss = memory.step_loss(questions, steps, step_mask, target)
    # Reference, row by row with plain Python loops.
    keys = [steps[e, b, :64] for e in range(3) for b in range(2) if step_mask[e, b]]
    centre = torch.stack(keys).mean(0)
    terms = []
    for b in range(2):
        real = [e for e in range(3) if step_mask[e, b]]
        q = questions[b, :64] - centre
        logits = torch.stack([torch.cosine_similarity(q, steps[e, b, :64] - centre, dim=0) / 0.1 for e in real])
        terms.append(-torch.log_softmax(logits, 0)[real.index(int(target[b]))])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert memory.step_loss(questions, steps, step_mask, torch.tensor([-100, -100])) is None


def test_the_step_loss_trains_the_key_encoder_through_the_model():
    torch.manual_seed(14)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", use_memory=True)).train()
    inputs = make_inputs(model.config, [5, 5], seed=15)
    episode = {k: v.expand(2, *v.shape[1:]) for k, v in episode_of(model.config, 3, seed=16).items()}
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    out = model(**inputs, labels=labels, **episode, memory_target_step=torch.tensor([0, 2]))
    assert out.memory_step_loss is not None and torch.isfinite(out.memory_step_loss)
    out.memory_step_loss.backward()
    for name in ("key_mixer.weight", "key_score.weight", "key_proj.weight"):
        grad = dict(model.named_parameters())["model.memory.encoder." + name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_key_narrower_than_the_slots_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="memory_key_dim"):
        MicroVLMConfig.from_preset("tiny", memory_key_dim=16)


def test_the_checkpoint_callback_saves_a_written_memory_only(memory_model, tmp_path):
    from types import SimpleNamespace

    from microvlm.train.callbacks import MemoryCheckpointCallback

    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, is_world_process_zero=True)
    (tmp_path / "checkpoint-3").mkdir()
    MemoryCheckpointCallback().on_save(args, state, None, model=memory_model)
    assert not (tmp_path / "checkpoint-3" / "memory_state.safetensors").exists()
    memory_model.write_memory(**make_inputs(memory_model.config, [4], seed=17))
    MemoryCheckpointCallback().on_save(args, state, None, model=memory_model)
    memory_model.reset_memory()
    memory_model.load_memory(tmp_path / "checkpoint-3")
    assert memory_model.memory_written


def test_save_memory_creates_its_folder(memory_model, tmp_path):
    memory_model.save_memory(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir" / "memory_state.safetensors").is_file()


def test_the_memory_encoder_standardises_over_the_batch_and_takes_a_single_row_in_training():
    from microvlm.memory_encoder import MemoryEncoder

    torch.manual_seed(18)
    encoder = MemoryEncoder(hidden_size=16, key_dim=8).train()
    embeds = torch.randn(5, 7, 16)
    text, image = torch.zeros(5, 7, dtype=torch.bool), torch.zeros(5, 7, dtype=torch.bool)
    text[:, 3:], image[:, :3] = True, True
    codes = encoder(embeds, text, image)
    assert codes.shape == (5, 8 + 2 * 16) == (5, encoder.code_dim)
    # Training: each value feature is standardised over the batch (batch norm with weight 1, bias 0).
    torch.testing.assert_close(codes[:, 8:].mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes[:, 8:].var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
    # A single row has no batch statistics: it uses the running ones, as in eval mode.
    single = encoder(embeds[:1], text[:1], image[:1])
    torch.testing.assert_close(single, encoder.eval()(embeds[:1], text[:1], image[:1]))


@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_the_memory_reconstruction_term_is_returned_and_weighted_into_the_loss(weight):
    torch.manual_seed(14)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny-m", memory_reconstruction_weight=weight)).eval()
    inputs = make_inputs(model.config, [5, 5], seed=15)
    episode = {k: v.expand(2, *v.shape[1:]) for k, v in episode_of(model.config, 3, seed=16).items()}
    out = model(**inputs, labels=inputs["input_ids"], **episode)
    if not weight:  # skipped, not computed: presets without the term keep their loss and random stream
        assert out.memory_reconstruction_loss is None
        return
    assert out.memory_reconstruction_loss is not None and out.memory_reconstruction_loss >= 0
    rest = out.lm_loss + 0.5 * out.alignment_loss + 0.02 * out.memory_kl + 0.005 * out.addressing_kl
    torch.testing.assert_close(out.loss, rest + weight * out.memory_reconstruction_loss)
