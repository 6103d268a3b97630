"""The Larimar memory on its own, against independent references (closed forms, torch.linalg.pinv)."""

import pytest
import torch

from microvlm.larimar_memory import LarimarMemory, MemoryState, pseudo_inverse, ridge_addresses


def make_memory(num_slots=32, code_dim=64, noise=0.01, **kwargs) -> LarimarMemory:
    torch.manual_seed(0)
    return LarimarMemory(num_slots, code_dim, observation_noise_std=noise, **kwargs).eval()


def codes_of(memory: LarimarMemory, z: torch.Tensor) -> torch.Tensor:
    return memory._codes(z)


@pytest.mark.parametrize("method", ["cholesky", "ben_israel_cohen"])
def test_pseudo_inverse_converges_to_torch_pinv_for_well_conditioned_matrices(method):
    torch.manual_seed(1)
    matrix = torch.randn(4, 64, 128)  # K ≤ C, condition number ≈ (√128+√64)/(√128−√64) ≈ 5.8
    reference = torch.linalg.pinv(matrix)
    error = (pseudo_inverse(matrix, method, steps=15) - reference).norm() / reference.norm()
    assert error < 1e-3, float(error)


def test_the_seeds_fixed_alpha_is_far_off_where_ours_converges():
    torch.manual_seed(1)
    matrix = torch.randn(512, 896) / 896**0.5  # unit-norm slots
    reference = torch.linalg.pinv(matrix)
    inverse = 5e-4 * matrix.T
    for _ in range(3):
        inverse = 2 * inverse - inverse @ matrix @ inverse
    assert (inverse - reference).norm() / reference.norm() > 0.99
    ours = pseudo_inverse(matrix, "ben_israel_cohen", steps=15)
    assert (ours - reference).norm() / reference.norm() < 0.05


def test_written_codes_are_read_back_and_degrade_gracefully_past_capacity():
    memory = make_memory(num_slots=32, code_dim=64, noise=0.01)
    errors = {}
    for n in (8, 24, 32, 64, 128):
        torch.manual_seed(n)
        z = torch.randn(n, 1, 64)
        state = memory.write(z, memory.prior(1))
        readout, _ = memory.read(z, state)
        target = codes_of(memory, z)
        errors[n] = float(((readout - target).norm(dim=-1) / target.norm(dim=-1)).mean())
    # N ≤ K: the posterior mean interpolates the written codes up to the noise/prior ratio σ²/(σ² + wᵀΣ0w):
    # with σ = 0.01 and unit prior variance that is far below 5%.
    assert errors[8] < 0.05 and errors[24] < 0.05 and errors[32] < 0.1, errors
    # N > K: at most K directions fit; the error grows but stays bounded (a projection never exceeds the code).
    assert errors[8] <= errors[64] <= errors[128] <= 1.0, errors


def test_reconstruction_error_is_the_mean_squared_gap_of_a_written_code_to_its_mean_read():
    memory = make_memory(num_slots=32, code_dim=64, noise=0.01)
    torch.manual_seed(3)
    written, other = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    state = memory.write(written, memory.prior(2))
    error = memory.reconstruction_error(written, state)
    readout, _ = memory.read(written, state)  # eval mode: the deterministic mean read
    assert error.shape == (4, 2)
    torch.testing.assert_close(error, (codes_of(memory, written) - readout).pow(2).mean(-1))
    assert float(error.max()) < 0.05 * float(memory.reconstruction_error(other, state).min())


def test_sequential_writes_equal_the_closed_form_bayesian_regression_posterior():
    memory = make_memory(num_slots=16, code_dim=24, noise=0.3)
    torch.manual_seed(2)
    steps, batch = 10, 2
    z = torch.randn(steps, batch, 24)
    addresses = torch.randn(steps, batch, 16)
    prior = memory.prior(batch)
    state = memory.write(z, prior, addresses=addresses)
    codes = codes_of(memory, z).double()
    sigma2 = memory.observation_noise_std**2
    for b in range(batch):
        w, y = addresses[:, b].double(), codes[:, b]
        prior_precision = torch.linalg.inv(prior.cov[b].double())
        cov = torch.linalg.inv(prior_precision + w.T @ w / sigma2)
        mean = cov @ (prior_precision @ prior.mean[b].double() + w.T @ y / sigma2)
        torch.testing.assert_close(state.cov[b].double(), cov, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(state.mean[b].double(), mean, rtol=1e-3, atol=1e-3)


def test_writing_with_negative_weight_forgets():
    memory = make_memory(num_slots=16, code_dim=32, noise=0.1)
    torch.manual_seed(3)
    before = memory.write(torch.randn(5, 1, 32), memory.prior(1))
    item = torch.randn(1, 1, 32)
    addresses = memory.address(item, before)
    written = memory.write(item, before, addresses=addresses)
    assert (written.mean - before.mean).norm() > 1e-2
    forgotten = memory.write(item, written, weight=-1.0, addresses=addresses)
    torch.testing.assert_close(forgotten.mean, before.mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(forgotten.cov, before.cov, rtol=1e-3, atol=1e-4)
    unchanged = memory.write(item, before, weight=0.0)
    assert torch.equal(unchanged.mean, before.mean)


@pytest.mark.parametrize("scale", [0.0, 1.0, 1e6])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_kl_terms_are_finite_for_any_input_and_the_state_stays_float32(scale, dtype):
    memory = make_memory().train()
    z = torch.randn(3, 2, 64) * scale
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        state = memory.write(z if dtype is None else z.to(dtype), memory.prior(2))
        readout, kl = memory.read(z if dtype is None else z.to(dtype), state)
    assert state.mean.dtype == state.cov.dtype == torch.float32
    assert torch.isfinite(readout).all() and torch.isfinite(kl["memory_kl"]) and torch.isfinite(kl["addressing_kl"])
    assert kl["memory_kl"] >= -1e-3 and kl["addressing_kl"] >= 0


def test_memory_kl_matches_the_gaussian_formula_and_is_zero_at_the_prior():
    memory = make_memory(num_slots=8, code_dim=16)
    prior = memory.prior(1)
    _, kl = memory.read(torch.randn(1, 1, 16), prior)
    assert abs(float(kl["memory_kl"])) < 1e-4
    state = memory.write(torch.randn(4, 1, 16), prior)
    _, kl = memory.read(torch.randn(1, 1, 16), state)
    # Independent: sum over the C columns of KL(N(m_c, Σ) ‖ N(m0_c, Σ0)) with torch.distributions, ÷ C.
    reference = (
        sum(
            torch.distributions.kl_divergence(
                torch.distributions.MultivariateNormal(state.mean[0, :, c].double(), state.cov[0].double()),
                torch.distributions.MultivariateNormal(prior.mean[0, :, c].double(), prior.cov[0].double()),
            )
            for c in range(16)
        )
        / 16
    )
    torch.testing.assert_close(kl["memory_kl"].double(), reference, rtol=1e-3, atol=1e-3)


def test_reads_are_deterministic_in_eval_and_sampled_in_training():
    memory = make_memory()
    z = torch.randn(2, 3, 64)
    state = memory.write(z, memory.prior(3))
    assert torch.equal(memory.read(z, state)[0], memory.read(z, state)[0])
    memory.train()
    assert not torch.equal(memory.read(z, state)[0], memory.read(z, state)[0])


def test_gradients_reach_the_prior_the_addressing_variance_and_the_lstm():
    memory = make_memory(use_lstm=True).train()
    z = torch.randn(4, 2, 64, requires_grad=True)
    state = memory.write(z, memory.prior(2))
    readout, kl = memory.read(z, state)
    (readout.pow(2).mean() + kl["memory_kl"] + kl["addressing_kl"]).backward()
    for name in (
        "prior_mean",
        "prior_log_variance",
        "addressing_log_variance",
        "lstm.weight_ih_l0",
        "key_norm.weight",
    ):
        grad = dict(memory.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_state_shapes():
    memory = make_memory(num_slots=12, code_dim=20)
    state = memory.write(torch.randn(3, 5, 20), memory.prior(5))
    assert isinstance(state, MemoryState)
    assert state.mean.shape == (5, 12, 20) and state.cov.shape == (5, 12, 12)
    assert memory.address(torch.randn(2, 5, 20), state).shape == (2, 5, 12)


def test_pseudo_inverse_of_a_tall_matrix_goes_through_the_small_gram_and_matches_torch_pinv():
    torch.manual_seed(4)
    matrix = torch.randn(3, 96, 24)  # K > C: the C×C Gram
    reference = torch.linalg.pinv(matrix)
    error = (pseudo_inverse(matrix) - reference).norm() / reference.norm()
    assert error < 1e-3, float(error)


def test_a_key_alone_reads_back_the_whole_code_written_under_it():
    memory = make_memory(num_slots=16, code_dim=48, key_dim=16, noise=0.01)
    torch.manual_seed(5)
    z = torch.randn(6, 2, 48)
    state = memory.write(z, memory.prior(2))
    question = torch.cat([z[..., :16], torch.randn(6, 2, 32)], -1)  # right keys, unrelated values
    readout, _ = memory.read(question, state)
    target = codes_of(memory, z)
    error = (readout - target).norm(dim=-1) / target.norm(dim=-1)
    assert float(error.max()) < 0.05, error
    # Control: with the values as the only match, nothing comes back.
    unrelated = torch.cat([torch.randn(6, 2, 16), z[..., 16:]], -1)
    wrong, _ = memory.read(unrelated, state)
    assert float(((wrong - target).norm(dim=-1) / target.norm(dim=-1)).min()) > 0.3


def test_writes_address_against_the_prior_so_a_negative_write_forgets_exactly_after_later_writes():
    memory = make_memory(num_slots=16, code_dim=32, key_dim=16, noise=0.1)
    torch.manual_seed(6)
    first, item, later = torch.randn(3, 1, 32), torch.randn(1, 1, 32), torch.randn(2, 1, 32)
    torch.testing.assert_close(
        memory.write(item, memory.prior(1)).mean,
        memory.write(item, memory.prior(1), addresses=memory.address(item)).mean,
    )
    expected = memory.write(later, memory.write(first, memory.prior(1)))
    state = memory.write(later, memory.write(item, memory.write(first, memory.prior(1))))
    forgotten = memory.write(item, state, weight=-1.0)  # no addresses given: the same ones, from the prior
    # Exact in exact arithmetic; a downdate divides by σ⁴/(σ² + wᵀΣw), so float32 round-off grows to ~1e-3.
    torch.testing.assert_close(forgotten.mean, expected.mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(forgotten.cov, expected.cov, rtol=1e-2, atol=1e-3)
    assert (state.mean - expected.mean).abs().max() > 0.1  # what was forgotten was there


def test_a_key_wider_than_the_code_is_refused():
    with pytest.raises(ValueError, match="key_dim"):
        LarimarMemory(8, 16, key_dim=17)


@pytest.mark.parametrize("shape", [(3, 16, 40), (3, 40, 16)])  # K ≤ d and K > d
def test_ridge_addresses_equal_queries_times_the_pseudo_inverse(shape):
    torch.manual_seed(7)
    matrix, queries = torch.randn(*shape), torch.randn(shape[0], 5, shape[2])
    torch.testing.assert_close(
        ridge_addresses(matrix, queries), queries @ pseudo_inverse(matrix), rtol=1e-4, atol=1e-4
    )
