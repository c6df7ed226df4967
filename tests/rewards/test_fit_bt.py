"""capo fit-bt: the Bradley-Terry scale's maximum-likelihood fit (hand values, recovery of a known
scale) and the command end to end on the shapes world's preference data."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capo.cli import main
from capo.errors import CapoError
from capo.rewards.fit_bt import FitBTConfig, fit, fit_bt_scale, nll_grad_hess

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_hand_derived_optimum():
    # Δ = [2, -1]: NLL'(s) = -(2 σ(-2s) - σ(s)) / 2 = 0  <=>  2 / (1 + u²) = u / (1 + u), u = e^s
    # <=>  u³ - u - 2 = 0  <=>  u = 1.5213797068045676 (the real root), s = log u = 0.41961502...
    fitted = fit_bt_scale(np.array([2.0, -1.0]))
    assert fitted["scale"] == pytest.approx(math.log(1.5213797068045676), abs=1e-10)
    assert abs(nll_grad_hess(fitted["scale"], np.array([2.0, -1.0]))[1]) < 1e-12
    assert (fitted["n"], fitted["agreement"]) == (2, 0.5)
    # Δ = [1, -1]: the NLL is symmetric in s, minimum at 0 with NLL = log 2
    sym = fit_bt_scale(np.array([1.0, -1.0]))
    assert sym["scale"] == pytest.approx(0.0, abs=1e-12) and sym["nll"] == pytest.approx(math.log(2.0))


def test_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    d = rng.normal(size=20000)
    chosen_first = rng.random(d.size) < 1.0 / (1.0 + np.exp(-2.0 * d))  # labels from sigma(2 d)
    fitted = fit_bt_scale(np.where(chosen_first, d, -d))
    assert abs(fitted["scale"] - 2.0) < 3 * fitted["scale_se"] and fitted["scale_se"] < 0.05


def test_separable_or_empty_pairs_are_errors():
    with pytest.raises(CapoError, match="infinite"):
        fit_bt_scale(np.array([0.5, 1.0, 2.0]))
    with pytest.raises(CapoError, match="no pairs"):
        fit_bt_scale(np.array([]))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory):
    """Pairs of the shapes world's preference data (recipes/train_preference.py: variants of held-out prompts,
    labelled by the hidden utility a·alignment + b·aesthetic + noise), as a Parquet file."""
    from capo.recipes.train_preference import PreferenceTrainConfig, group_pairs, make_groups

    cfg = PreferenceTrainConfig(group_size=4)
    data = make_groups("heldout", 30, cfg, np.random.default_rng(0))
    pairs = group_pairs(30, 4, data["utility"])
    table = pa.table({
        "prompt": [data["prompts"][w] for w, _ in pairs],
        "chosen": [png(data["images"][w]) for w, _ in pairs],
        "rejected": [png(data["images"][lo]) for _, lo in pairs],
    })  # fmt: skip
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(table, path)
    return path


def test_command_fits_shapes_aesthetic_on_shapes_preferences(shapes_pairs, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert (
        main(["fit-bt", "--pairs", str(shapes_pairs), "--reward", "shapes-aesthetic", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["reward"], result["n"], result["declared_bt_scale"]) == ("shapes-aesthetic", 180, 10.0)
    # aesthetics is one of the two parts of the hidden utility: positive scale, agreement above chance,
    # and the fitted scale fits the pairs at least as well as the declared one
    assert result["scale"] > 3 * result["scale_se"] and result["agreement"] > 0.5
    assert result["nll"] <= result["nll_at_declared"] + 1e-12


def test_limit_columns_and_errors(shapes_pairs, tmp_path):
    first = fit(FitBTConfig(pairs=str(shapes_pairs), reward="shapes-aesthetic", limit=40))
    assert first["n"] == 40
    with pytest.raises(CapoError, match="no column 'winner'"):
        fit(FitBTConfig(pairs=str(shapes_pairs), reward="shapes-aesthetic", chosen_column="winner"))
    with pytest.raises(CapoError, match="no such Parquet"):
        fit(FitBTConfig(pairs=str(tmp_path / "none.parquet"), reward="shapes-aesthetic"))
    assert main(["fit-bt", "--pairs", str(tmp_path / "none.parquet"), "--reward", "shapes-aesthetic"]) == 2


def test_datasets_directories_give_the_same_fit(shapes_pairs, tmp_path):
    import datasets

    datasets.Dataset(pq.read_table(shapes_pairs)).save_to_disk(str(tmp_path / "ds"))
    from_parquet = fit(FitBTConfig(pairs=str(shapes_pairs), reward="shapes-aesthetic", limit=60))
    from_datasets = fit(FitBTConfig(pairs=str(tmp_path / "ds"), reward="shapes-aesthetic", limit=60))
    assert from_datasets["scale"] == pytest.approx(from_parquet["scale"], rel=1e-12)
