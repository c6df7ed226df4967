"""Prompt files and built-in sets: formats, ids, errors naming file and row, subsets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capo.errors import CapoError
from capo.pipeline.prompts import (
    Prompt,
    balanced_plan,
    from_table,
    load_prompts,
    prompts_table,
    subset,
    text_id,
)


def test_txt_skips_blank_lines_and_hashes_ids(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  a blue square  \n")
    ps = load_prompts(str(f))
    assert [p.prompt for p in ps] == ["a red circle", "a blue square"]
    assert ps[0].prompt_id == text_id("a red circle") and ps[0].prompt_id.startswith("p-")
    assert ps[0].prompt_id != ps[1].prompt_id


def test_csv_with_ids_categories_and_extra_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt_id,prompt,category,source\nx1,a cat,animals,web\nx2,a dog,,web\n")
    ps = load_prompts(str(f))
    got = [(p.prompt_id, p.prompt, p.category) for p in ps]
    assert got == [("x1", "a cat", "animals"), ("x2", "a dog", "")]
    assert ps[0].metadata == {"source": "web"}


def test_jsonl_and_parquet(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "one"}) + "\n" + json.dumps({"prompt": "two", "prompt_id": "b"}))
    assert [p.prompt_id for p in load_prompts(str(j))] == [text_id("one"), "b"]
    q = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["u", "v"], "category": ["c1", "c2"]}), q)
    assert [(p.prompt, p.category) for p in load_prompts(str(q))] == [("u", "c1"), ("v", "c2")]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", "\n\n", r"empty\.txt: no prompts in file"),
        ("dup.txt", "a\nb\na\n", r"dup\.txt, row 3: duplicate prompt 'a' \(first at row 1\)"),
        ("blank.csv", "prompt\nx\n \n", r"blank\.csv, row 3: empty prompt"),
        ("dupid.csv", "prompt_id,prompt\nk,x\nk,y\n", r"dupid\.csv, row 3: duplicate prompt_id 'k'"),
        ("nocol.csv", "text\nx\n", r"nocol\.csv: no 'prompt' column"),
        ("bad.jsonl", '{"prompt": "a"}\n{oops\n', r"bad\.jsonl, row 2: invalid JSON"),
        ("p.yaml", "x", r"unknown prompt file type '\.yaml'"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CapoError, match=match) as e:
        load_prompts(str(f))
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CapoError, match="prompt file not found"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_builtin_shapes_sets_are_disjoint():
    train, held = load_prompts("shapes:train"), load_prompts("shapes:heldout")
    assert train and held
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert {p.split for p in held} == {"heldout"} and all(p.category for p in held)


def test_builtin_train_val_test_are_disjoint():
    sets = {name: load_prompts(f"shapes:{name}") for name in ("train", "val", "test")}
    texts = {name: {p.prompt for p in ps} for name, ps in sets.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    assert texts["test"] == {p.prompt for p in load_prompts("shapes:heldout")}
    assert {p.split for p in sets["val"]} == {"val"} and {p.split for p in sets["test"]} == {"test"}


@pytest.mark.parametrize("name", ["shapes:val", "shapes:test"])
def test_validation_and_test_evaluations_are_category_balanced(name):
    prompts = load_prompts(name)
    plan = balanced_plan(prompts, 64, seed=1000)
    per_cat: dict[str, int] = {}
    for p, k in plan:
        per_cat[p.category] = per_cat.get(p.category, 0) + k
    assert per_cat == {c: 64 for c in {p.category for p in prompts}} and len(per_cat) == 6
    seeds = {p.category: [] for p, _ in plan}
    for p, k in plan:
        seeds[p.category].append(k)
    assert seeds["single_object"] == [64]  # one prompt, 64 seeds
    assert all(max(v) - min(v) <= 1 for v in seeds.values())
    assert seeds["position"] == [1] * 64  # 221 prompts: 64 of them, one seed each
    assert plan == balanced_plan(prompts, 64, seed=1000)


def test_balanced_plan_spreads_seeds_by_hand():
    ps = [Prompt(f"a{i}", f"a {i}", "a") for i in range(3)] + [Prompt("b0", "b 0", "b")]
    plan = balanced_plan(ps, 7)
    assert sorted(k for p, k in plan if p.category == "a") == [2, 2, 3]  # 7 = 3 + 2 + 2
    assert [(p.prompt_id, k) for p, k in plan if p.category == "b"] == [("b0", 7)]
    assert [p.prompt_id for p, _ in plan] == ["a0", "a1", "a2", "b0"]  # file order kept
    with pytest.raises(CapoError, match="images_per_category"):
        balanced_plan(ps, 0)


def test_subset_is_deterministic_balanced_and_ordered():
    ps = load_prompts("shapes:train")
    a, b = subset(ps, 60, seed=0), subset(ps, 60, seed=0)
    assert a == b and len(a) == 60
    sizes = {c: sum(p.category == c for p in ps) for c in {p.category for p in ps}}
    counts = {c: sum(p.category == c for p in a) for c in sizes}
    small = {c for c, n in sizes.items() if n <= 10}  # single_object (2), two_object (10): all kept
    assert small and all(counts[c] == sizes[c] for c in small)
    rest = [counts[c] for c in sizes if c not in small]
    assert max(rest) - min(rest) <= 1  # round-robin over the remaining categories
    order = {p.prompt_id: i for i, p in enumerate(ps)}
    assert [order[p.prompt_id] for p in a] == sorted(order[p.prompt_id] for p in a)
    assert subset(ps, 60, seed=1) != a
    assert subset(ps, None) == ps


def test_table_round_trip():
    ps = load_prompts("shapes:heldout")[:5]
    back = from_table(prompts_table(ps))
    assert back == ps


def test_gold_checker_is_the_worlds_for_its_prompts():
    # the shapes world's checker reads images of shapes prompts: a blank image shows no object
    from PIL import Image

    from capo.pipeline.prompts import Prompt, gold_checker, load_prompts

    shapes = load_prompts("shapes:test")[:3]
    check = gold_checker("shapes", shapes)
    assert check is not None
    assert check([Image.new("RGB", (32, 32), "white")] * 3).tolist() == [0.0, 0.0, 0.0]
    assert gold_checker("shapes", [Prompt("x", "a photo of a cat")]) is None  # not its grammar
    assert gold_checker(None, shapes) is None and gold_checker("sd", shapes) is None
