"""Model soups and LoRA merging (paper Sec. 5.2, docs/design.md §2.9): one merge over task vectors."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from capo.errors import CapoError
from capo.soup import COMBINES, combine_slerp, lora_delta, merge_task_vectors, slerp, task_vectors

E = torch.eye(3)


def soup(base, state_dicts, method="linear", weights=None):
    """The soup of full models: their task vectors θ_i − θ₀ merged."""
    return merge_task_vectors(base, task_vectors(base, state_dicts), method, weights)


def _sd(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r)} for r in rows]


def test_linear_hand_values():
    # θ0 = 0, θ1 = (2, 0), θ2 = (0, 4): uniform -> (1, 2); weights (0.5, 0.25) -> (1, 1).
    base, a, b = _sd([0.0, 0.0], [2.0, 0.0], [0.0, 4.0])
    assert soup(base, [a, b])["w"].tolist() == [1.0, 2.0]
    assert soup(base, [a, b], weights=[0.5, 0.25])["w"].tolist() == [1.0, 1.0]
    # τ_i = θ_i − θ0 on a non-zero base: θ0 = (1, 1) -> τ = (1, −1), (−1, 3); uniform -> (1, 2).
    base1 = {"w": torch.tensor([1.0, 1.0])}
    assert soup(base1, [a, b])["w"].tolist() == [1.0, 2.0]
    assert task_vectors(base1, [a])[0]["w"].tolist() == [1.0, -1.0]


def test_slerp_hand_values():
    # Orthonormal e1, e2 at t = 1/2: Ω = π/2, sin(π/4)/sin(π/2) = √2/2 each.
    torch.testing.assert_close(slerp(E[0], E[1], 0.5), torch.tensor([1, 1, 0]) * math.sqrt(0.5))
    # Different norms, 2 e1 and e2: the raw vectors are interpolated -> √2/2 · (2, 1, 0).
    torch.testing.assert_close(slerp(2 * E[0], E[1], 0.5),
                               torch.tensor([2.0, 1.0, 0.0]) * math.sqrt(0.5))
    # k = 3 orthonormal, uniform: by symmetry the spherical mean is q = (1, 1, 1)/√3, at
    # cos θ_i = 1/√3 from each; c_i = (1/3)(θ/sin θ) / (3 · (1/3) θ cot θ) = 1/(3 cos θ) = 1/√3.
    zero = {"w": torch.zeros(3)}
    merged = soup(zero, [{"w": E[0]}, {"w": E[1]}, {"w": E[2]}], "slerp")["w"]
    torch.testing.assert_close(merged, torch.ones(3) / math.sqrt(3))
    # weights (2, 1) on e1, e2 (t = 1/3): the closed form sin(2/3 · π/2), sin(1/3 · π/2) = √3/2, 1/2
    merged = soup(zero, [{"w": E[0]}, {"w": E[1]}], "slerp", [2.0, 1.0])["w"]
    torch.testing.assert_close(merged, torch.tensor([math.sqrt(3) / 2, 0.5, 0.0]))


def test_slerp_falls_back_to_linear():
    a = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: lerp
    torch.testing.assert_close(slerp(a, -a, 0.5), torch.zeros(3))  # antiparallel: lerp
    torch.testing.assert_close(slerp(a, torch.zeros(3), 0.25), 0.75 * a)  # zero vector
    assert torch.isfinite(slerp(torch.zeros(3), torch.zeros(3), 0.5)).all()


def test_non_float_tensors_and_dtype_are_kept():
    base = {"w": torch.zeros(4, dtype=torch.bfloat16), "steps": torch.tensor(3)}
    tuned = {"w": torch.ones(4, dtype=torch.bfloat16), "steps": torch.tensor(9)}
    for method in COMBINES:
        out = soup(base, [tuned, tuned], method)
        assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.0] * 4
        assert out["steps"].item() == 3


def test_bad_inputs():
    base, a = _sd([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(CapoError, match="weights"):
        soup(base, [a], weights=[0.5, 0.5])
    with pytest.raises(CapoError, match="'extra'"):
        soup(base, [{**a, "extra": torch.zeros(1)}])
    with pytest.raises(CapoError, match="shape"):
        soup(base, [{"w": torch.zeros(3)}], "slerp")
    with pytest.raises(CapoError, match="> 0"):
        soup(base, [a, a], "slerp", [1.0, -1.0])
    with pytest.raises(CapoError, match="method"):
        merge_task_vectors(base, [], method="ties")


vectors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=6, max_size=6).map(
    lambda v: torch.tensor(v, dtype=torch.float64).view(2, 3))


@settings(max_examples=50, deadline=None)
@given(vectors, vectors, st.integers(1, 4), st.sampled_from(["linear", "slerp"]))
def test_identical_task_vectors_are_returned(theta0, theta, k, method):
    # Every τ_i = τ: slerp(τ, τ, t) = τ (Ω = 0) and Σ (1/k) τ = τ, so θ0 + τ = θ.
    out = soup({"w": theta0}, [{"w": theta.clone()} for _ in range(k)], method)["w"]
    torch.testing.assert_close(out, theta)


@settings(max_examples=50, deadline=None)
@given(vectors, st.lists(vectors, min_size=2, max_size=4))
def test_linear_uniform_merge_is_permutation_invariant(theta0, thetas):
    sds = [{"w": t} for t in thetas]
    ref = soup({"w": theta0}, sds)["w"]
    for perm in itertools.permutations(sds):
        torch.testing.assert_close(soup({"w": theta0}, list(perm))["w"], ref)


positive = st.floats(0.05, 5.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(vectors, positive), min_size=2, max_size=4), st.randoms(use_true_random=False))
def test_slerp_merge_is_order_independent(models, rng):
    # The spherical mean is a symmetric function of the (τ_i, w_i): any order gives the same soup.
    taus, weights = [t for t, _ in models], [w for _, w in models]
    order = list(range(len(models)))
    rng.shuffle(order)
    ref = combine_slerp(taus, weights)
    out = combine_slerp([taus[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(vectors, vectors, positive, positive)
def test_slerp_merge_of_two_is_the_closed_form_slerp(a, b, w1, w2):
    # k = 2: slerp(τ_1, τ_2; t = w_2 / (w_1 + w_2)), in either order.
    expected = slerp(a, b, w2 / (w1 + w2))
    torch.testing.assert_close(combine_slerp([a, b], [w1, w2]), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine_slerp([b, a], [w2, w1]), expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(vectors, vectors, vectors, positive, positive)
def test_slerp_merge_weights_models_as_asked(a, b, c, w1, w2):
    # A model listed twice counts as once with twice the weight; weights are scale-free.
    torch.testing.assert_close(combine_slerp([a, b, a, c], [w1, w2, w1, 1.0]),
                               combine_slerp([a, b, c], [2 * w1, w2, 1.0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine_slerp([a, b, c], [w1, w2, 1.0]),
                               combine_slerp([a, b, c], [3 * w1, 3 * w2, 3.0]), rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(vectors, vectors, st.floats(0.0, 1.0))
def test_slerp_keeps_the_norm_of_equal_norm_vectors(a, b, t):
    # For |a| = |b| = 1, slerp moves along the great circle: |slerp(a, b; t)| = 1.
    # (Exactly antiparallel vectors have no unique great circle; slerp falls back to lerp.)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    a, b = a.flatten() / a.norm(), b.flatten() / b.norm()
    if torch.dot(a, b) < -1 + 1e-9:
        return
    assert slerp(a, b, t).norm().item() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(vectors, vectors)
def test_linear_merge_of_one_model_with_weight_one_returns_it(theta0, theta):
    out = soup({"w": theta0}, [{"w": theta}], weights=[1.0])["w"]
    torch.testing.assert_close(out, theta)


class _Tiny(nn.Module):
    """Linear, 1x1 conv and 3x3 conv layers, the layer kinds LoRA targets in a UNet."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv3 = nn.Conv2d(3, 4, 3)


def _peft(seed: int, r: int = 2, alpha: float = 6.0):
    """(base state dict, peft model with random non-zero LoRA A and B)."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    base = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin.0", "lin.2", "conv1", "conv3"],
                     init_lora_weights=False)
    return base, get_peft_model(model, cfg)


def test_lora_merge_equals_peft_merge_and_unload():
    base, pm = _peft(seed=1)
    lora = get_peft_model_state_dict(pm)  # keys base_model.model.lin.0.lora_A.weight, ...
    full = {k: v.clone() for k, v in pm.state_dict().items()}  # ....lora_A.default.weight
    expected = pm.merge_and_unload().state_dict()
    for source in (lora, full):
        delta = lora_delta(source, alpha=6.0)  # s = alpha / r = 3
        assert set(delta) == {"lin.0.weight", "lin.2.weight", "conv1.weight", "conv3.weight"}
        merged = merge_task_vectors(base, [delta], "linear", [1.0])
        assert set(merged) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    assert (merged["conv3.weight"] - base["conv3.weight"]).abs().max() > 1e-2


def test_two_lora_adapters_soup_like_their_dense_merges():
    # LoRA soup = soup of the models peft merges densely, for both methods.
    base, pm1 = _peft(seed=1)
    _, pm2 = _peft(seed=2)
    deltas = [lora_delta(get_peft_model_state_dict(pm), scaling=3.0) for pm in (pm1, pm2)]
    dense = [pm.merge_and_unload().state_dict() for pm in (pm1, pm2)]
    for method in COMBINES:
        expected = soup(base, dense, method)
        merged = merge_task_vectors(base, deltas, method)
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_lora_key_errors():
    lora = {"m.lora_A.weight": torch.ones(2, 3)}
    with pytest.raises(CapoError, match="lora_B"):
        lora_delta(lora, scaling=1.0)
    with pytest.raises(CapoError, match="exactly one"):
        lora_delta(lora)
    with pytest.raises(CapoError, match="unsupported"):
        lora_delta({"m.lora_magnitude_vector.default.weight": torch.ones(3)}, scaling=1.0)
    two = {"m.lora_A.a.weight": torch.ones(2, 3), "m.lora_B.a.weight": torch.ones(4, 2),
           "m.lora_A.b.weight": torch.ones(2, 3), "m.lora_B.b.weight": torch.ones(4, 2)}
    with pytest.raises(CapoError, match="adapter_name"):
        lora_delta(two, scaling=1.0)
    assert lora_delta(two, scaling=0.5, adapter_name="b")["m.weight"].tolist() == [[1.0] * 3] * 4
    with pytest.raises(CapoError, match="matches no base"):
        merge_task_vectors({"x.weight": torch.zeros(4, 3)}, [lora_delta(two, 1.0, adapter_name="a")])


def test_lora_on_a_tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2).eval()
    base = copy.deepcopy(unet.state_dict())
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                "conv1"]))
    delta = lora_delta(get_peft_model_state_dict(unet), alpha=2)
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()  # peft's own dense merge into base_layer
    merged_by_peft = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
                      if ".lora_" not in k}
    merged = merge_task_vectors(base, [delta])
    assert any(".conv1.weight" in k for k in delta) and any(".to_q.weight" in k for k in delta)
    assert set(merged) == set(merged_by_peft)
    for key, value in merged_by_peft.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
