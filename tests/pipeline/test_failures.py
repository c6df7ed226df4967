"""The failure catalogue (issue 16): every bad input or broken environment ends in ONE error line
``capo STAGE: error: ...`` with exit code 2, before any work, and leaves every complete file
unchanged; damaged files are regenerated or refused by name (docs/failures.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file, save_file

from capo.cli import main
from capo.pipeline.integrity import LOCK, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = {"generate": {"prompts": "shapes:train", "num_prompts": 4, "samples_per_prompt": 3, "steps": 2,
                     "chunk_size": 2},
        "score": {"reward": ["shapes-alignment", "shapes-aesthetic"]},
        "select": {"rule": "frs"},
        "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2,
                  "log_with": "none", "loader_workers": 0},
        "evaluate": {"num_prompts": 2, "seeds": 1, "n_boot": 20, "grid_prompts": 1}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, base_model) -> dict[str, Path]:
    """The tiny base model (conftest.py), its config file, and one finished run of every stage."""
    root = tmp_path_factory.mktemp("world")
    config = {"run": str(root / "unused"), "threads": 1, **TINY}
    config["generate"] = {**TINY["generate"], "model": base_model}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(root / "tiny.yaml"), "--run", str(root / "done")]) == 0
    return {"root": root, "model": Path(base_model), "config": root / "tiny.yaml", "done": root / "done"}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def one_line_error(capsys, argv: list[str], match: str, root: Path) -> str:
    """Exit 2, exactly one ``capo STAGE: error:`` line containing ``match`` (at most ~600
    characters, no traceback), and no file that existed under ``root`` changed or removed."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"capo {argv[0]}: error: "), err[-2000:]
    assert match in lines[0], lines[0]
    assert len(lines[0]) < 700 and "Traceback" not in err
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before  # complete files unchanged, none removed
    return lines[0]


def copy_run(world, tmp_path: Path, keep_model: bool = True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["done"], run)
    if not keep_model:
        for name in ("model", "checkpoints", "eval", "trainset", "logs"):
            shutil.rmtree(run / name, ignore_errors=True)
    return run


def tiny_train(world, run: Path) -> list[str]:
    """``capo train`` with the tiny run's settings (the config file's train section)."""
    return ["train", "--run", str(run), "--config", str(world["config"])]


def truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- settings: refused before any work (the ranges and choices declared in doc()) ----------------
def _train(*flags: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, run: ["train", "--run", str(run), "--log-with", "none", *flags]


def _gen(*flags: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, run: ["generate", "--run", str(run), "--model", str(w["model"]), *flags]


def _run(*sets: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, run: ["run", "--config", str(w["config"]), "--run", str(run),
                           *[a for s in sets for a in ("--set", s)]]


SETTINGS = {
    "beta nan": (_train("--beta", "nan"), "config key 'beta' must be a finite number"),
    "beta inf": (_train("--beta", "inf"), "config key 'beta' must be a finite number"),
    "beta negative": (_train("--beta", "-5"), "config key 'beta' must be > 0, got -5.0"),
    "beta zero": (_train("--beta", "0"), "config key 'beta' must be > 0"),
    "sigmoid bias nan": (_train("--sigmoid-bias", "nan"), "'sigmoid_bias' must be a finite number"),
    "max grad norm nan": (_train("--max-grad-norm", "nan"), "'max_grad_norm' must be a finite number"),
    "max grad norm negative": (_train("--max-grad-norm", "-1"), "'max_grad_norm' must be >= 0"),
    "adam epsilon zero": (_train("--adam-epsilon", "0"), "'adam_epsilon' must be > 0"),
    "learning rate zero": (_train("--learning-rate", "0"), "'learning_rate' must be > 0"),
    "learning rate negative": (_train("--learning-rate=-1e-4"), "'learning_rate' must be > 0"),
    "learning rate nan": (_train("--learning-rate", "nan"), "'learning_rate' must be a finite number"),
    "weight decay negative": (_train("--weight-decay", "-0.1"), "'weight_decay' must be >= 0"),
    "t_min above t_max": (_train("--t-min", "0.9", "--t-max", "0.1"), "'t_min' (0.9) must be < t_max (0.1)"),
    "warm-up past max_steps": (_train("--warmup-steps", "10", "--max-steps", "2"),
                               "'warmup_steps' (10) must be <= max_steps (2)"),
    "unknown objective": (_train("--objective", "dpoo"), "'objective' must be one of dpo, ipo, capo"),
    "lora rank zero": (_train("--lora-rank", "0"), "'lora_rank' must be >= 1"),
    "guidance nan": (_gen("--guidance", "nan"), "config key 'guidance' must be a finite number"),
    "one sample per prompt": (_gen("--samples-per-prompt", "1"), "'samples_per_prompt' must be >= 2"),
    "cuda on a CPU build": (_gen("--device", "cuda"), "config key 'device' is 'cuda' but"),
    "unknown device": (_gen("--device", "gpu7"), "unknown device 'gpu7'"),
    "unknown dtype": (_gen("--dtype", "float8"), "'dtype' must be one of float32, float16, bfloat16"),
    "run: beta nan": (_run("train.beta=.nan"), "config key 'beta' must be a finite number"),
    "run: adam epsilon zero": (_run("train.adam_epsilon=0"), "'adam_epsilon' must be > 0"),
    "run: one sample": (_run("generate.samples_per_prompt=1"), "'samples_per_prompt' must be >= 2"),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_bad_setting_is_one_line_before_any_work(case, world, tmp_path, capsys):
    argv, match = SETTINGS[case]
    run = tmp_path / "fresh"
    one_line_error(capsys, argv(world, run), match, tmp_path)
    assert not run.exists()


@pytest.mark.parametrize(("setting", "match"), [
    ("train_seeds=[-1]", "'train_seeds' must be >= 0, got -1"),
    ("sweep_learning_rates=[.inf]", "'sweep_learning_rates' must be a finite number"),
    ("hyper={vp: {capo: {beta: .inf}}}", "'hyper.vp.capo' must hold positive numbers"),
    ("train.beta=.nan", "config key 'beta' must be a finite number"),
])
def test_bad_experiment_setting(setting, match, tmp_path, capsys):
    one_line_error(capsys, ["experiment", "smoke", "--out", str(tmp_path / "x"), "--set", setting,
                            "--dry-run"], match, tmp_path)
    assert not (tmp_path / "x").exists()


def test_unknown_model_name_fails_at_once(tmp_path, capsys):
    one_line_error(capsys, ["generate", "--run", str(tmp_path / "r"), "--model", "shapes-vpp"],
                   "unknown model 'shapes-vpp': not a built-in name", tmp_path)
    one_line_error(capsys, ["generate", "--run", str(tmp_path / "r"), "--model", "no/such-model"],
                   "model 'no/such-model' is not in the local hub cache", tmp_path)


# --- files that are not what they claim ----------------------------------------------------------
NON_UTF8 = b"a red circle\n\xff\xfe broken \xe9\n"


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_non_utf8_prompt_file(suffix, world, tmp_path, capsys):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes((b"prompt\n" if suffix == ".csv" else b"") + NON_UTF8)
    one_line_error(capsys, _gen("--prompts", str(path))(world, tmp_path / "r"), f"{path}: not UTF-8 text",
                   tmp_path)


def test_non_utf8_and_huge_inputs(world, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"generate:\n  num_prompts: 3 \xff\n")
    one_line_error(capsys, ["run", "--config", str(config), "--run", str(tmp_path / "r")],
                   f"{config}: not UTF-8 text", tmp_path)
    huge = "a red circle " * 100_000
    prompts = tmp_path / "huge.txt"
    prompts.write_text(f"{huge}\n{huge}\n")
    line = one_line_error(capsys, _gen("--prompts", str(prompts))(world, tmp_path / "r"), "duplicate prompt",
                          tmp_path)
    assert "characters)" in line  # the 1.3 M-character prompt is cut, not echoed


DAMAGE = {  # (file to truncate in a finished run, command, what the error names)
    "samples shard at calibrate": ("samples/part-00000-00000.parquet", ["calibrate"], "damaged Parquet file"),
    "pairs at train": ("pairs.parquet", ["train", "--log-with", "none"], "pairs.parquet: damaged Parquet"),
    "embeddings shard at train": ("embeddings/part-00000-00001.parquet", ["train", "--log-with", "none"],
                                  "embeddings/part-00000-00001.parquet: damaged Parquet file"),
    "calibrated at select": ("calibrated.parquet", ["select"], "calibrated.parquet: damaged Parquet"),
    "reward at calibrate": ("rewards/shapes-aesthetic.parquet", ["calibrate"], "shapes-aesthetic.parquet"),
    "run record": ("config.yaml", ["calibrate"], "config.yaml: unreadable run record"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_file_is_named(case, world, tmp_path, capsys):
    name, argv, match = DAMAGE[case]
    run = copy_run(world, tmp_path, keep_model=False)
    path = run / name
    path.write_bytes(b"\x00\xff: [" + path.read_bytes()[7:40]) if name.endswith(".yaml") else truncate(path)
    one_line_error(capsys, [argv[0], "--run", str(run), *argv[1:]], match, run)


def test_flipped_byte_fails_its_page_checksum(world, tmp_path, capsys):
    run = copy_run(world, tmp_path, keep_model=False)
    shard = run / "samples" / "part-00000-00000.parquet"
    meta = pq.read_metadata(shard).row_group(0)
    image = next(c for c in map(meta.column, range(meta.num_columns)) if c.path_in_schema == "image.bytes")
    data = bytearray(shard.read_bytes())
    start = image.dictionary_page_offset or image.data_page_offset
    data[start + image.total_compressed_size // 2] ^= 0xFF  # a byte of the PNGs; the footer still reads
    shard.write_bytes(bytes(data))
    one_line_error(capsys, ["score", "--run", str(run), "--reward", "shapes-preference"],
                   "part-00000-00000.parquet: damaged Parquet file (could not verify page integrity", run)
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2 and "part-00000-00000.parquet" in capsys.readouterr().out


def test_damaged_or_non_finite_model_is_refused_at_evaluate(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    weights = run / "model" / "adapter_model.safetensors"
    good = weights.read_bytes()
    truncate(weights, 1000)
    one_line_error(capsys, ["evaluate", "--run", str(run)], "adapter_model.safetensors: 1000 bytes, expected",
                   run)
    state = load_file(world["done"] / "model" / "adapter_model.safetensors")
    state[next(iter(state))][0] = float("nan")
    save_file(state, weights)
    write_manifest(run / "model")  # a whole file holding a NaN: caught by the finiteness check
    one_line_error(capsys, ["evaluate", "--run", str(run)], "holds non-finite values", run)
    weights.write_bytes(good)


def test_evaluate_tuned_checks_its_base_and_writes_its_own_directory(world, tmp_path, capsys):
    from capo.models.shapes import build_shapes_model

    run = copy_run(world, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(world["done"], other, ignore=shutil.ignore_patterns("model", "checkpoints"))
    build_shapes_model("vp", size="tiny", seed=3).save_pretrained(str(tmp_path / "tiny3"))
    spec = json.loads((other / "base_model.json").read_text())
    (other / "base_model.json").write_text(json.dumps({**spec, "model": str(tmp_path / "tiny3"),
                                                       "path": str(tmp_path / "tiny3")}))
    one_line_error(capsys, ["evaluate", "--run", str(other), "--tuned", str(run / "model")],
                   "was trained on base model", tmp_path)
    before = snapshot(run / "eval")
    flags = ["--num-prompts", "2", "--seeds", "1", "--n-boot", "10", "--reward", "shapes-aesthetic"]
    assert main(["evaluate", "--run", str(run), "--tuned", str(world["done"] / "model"), *flags]) == 0
    assert snapshot(run / "eval") == before  # the run's own evaluation is not overwritten
    assert len(list(run.glob("eval-model-*/results.json"))) == 1


def test_full_disk_read_only_dir_and_torch_enforce_fail(world, tmp_path, capsys, monkeypatch):
    """OSError 28 / 30 and torch's inline_container failure at a checkpoint save: one line."""
    import capo.pipeline.checkpoint as C
    import capo.pipeline.rundir as R

    run = copy_run(world, tmp_path, keep_model=False)
    for code, match in ((errno.ENOSPC, "no space left on the device"), (errno.EROFS, "read-only file")):
        def fail(table, path, *a, code=code, **k):
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(R.pq, "write_table", fail)
        tmp = f"calibrated.parquet.tmp-{os.getpid()}"
        one_line_error(capsys, ["calibrate", "--run", str(run)], f"{tmp}: {match}", run)
        monkeypatch.undo()

    def enforce_fail(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(C.Accelerator, "save_state", enforce_fail)
    one_line_error(capsys, [*tiny_train(world, run)], "is the disk full?", run)


def test_debug_raises_the_original_error(tmp_path):
    from capo.errors import CapoError

    for argv in (["--debug", "train", "--beta", "nan"], ["train", "--beta", "nan", "--debug"]):
        with pytest.raises(CapoError, match="'beta' must be a finite number"):
            main([*argv, "--run", str(tmp_path / "r")])


# --- scoring, identity and locks -----------------------------------------------------------------
def test_calibrate_refuses_an_unfinished_reward(world, tmp_path, capsys):
    run = copy_run(world, tmp_path, keep_model=False)
    (run / "rewards" / "shapes-aesthetic.parquet").unlink()
    (run / "rewards" / "shapes-aesthetic.parts").mkdir()
    one_line_error(capsys, ["calibrate", "--run", str(run)], "reward 'shapes-aesthetic' is not completely "
                   "scored", run)


@pytest.mark.parametrize("flag", ["--max-grad-norm=0.5", "--grad-accum=2", "--beta=10", "--seed=1"])
def test_resume_with_another_trajectory_setting(flag, world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    shutil.rmtree(run / "model")
    key = flag.split("=")[0]
    one_line_error(capsys, [*tiny_train(world, run), "--resume", flag], f"{key} {flag.split('=')[1]}", run)


def test_a_second_process_on_the_same_run_is_refused(world, tmp_path, capsys):
    run = copy_run(world, tmp_path, keep_model=False)
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "stage": "train"}))
    one_line_error(capsys, ["calibrate", "--run", str(run)], "in use by train (pid 1", run)
    (run / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "stage": "x"}))
    assert main(["calibrate", "--run", str(run)]) == 0  # a stale lock (its process is gone) is taken over
    assert not (run / LOCK).exists()


def test_non_finite_loss_stops_training_naming_the_step(world, tmp_path, capsys):
    run = copy_run(world, tmp_path, keep_model=False)
    for shard in (run / "samples").glob("part-*.parquet"):
        t = pq.read_table(shard)
        bad = [b"\x00\x00\xc0\x7f" * (len(x) // 4) for x in t.column("latent").to_pylist()]  # NaN float32
        t = t.set_column(t.schema.get_field_index("latent"), "latent", pa.array(bad, pa.binary()))
        pq.write_table(t, shard)
    one_line_error(capsys, tiny_train(world, run), "train: step 1: loss is nan", run)
    assert not (run / "model").exists()


# --- repair: damaged regenerable files are made again, a damaged checkpoint is passed over --------
HISTORY = ("config.yaml", "model/train_summary.json", "model/manifest.json")


def outputs(run: Path) -> dict[str, str]:
    """sha256 of what the stages made (not logs, checkpoints, caches or records of the history)."""
    return {k: v for k, v in snapshot(run).items() if k not in HISTORY and k != LOCK
            and Path(k).parts[0] not in ("logs", "checkpoints", "trainset")}


def test_capo_run_repairs_a_damaged_run_to_the_same_outputs(world, tmp_path, capsys):
    run = copy_run(world, tmp_path)
    for name in ("samples/part-00000-00001.parquet", "rewards/shapes-aesthetic.parquet"):
        truncate(run / name)
    truncate(run / "model" / "adapter_model.safetensors", 1000)
    truncate(run / "checkpoints" / "step-2" / "random_states_0.pkl", 10)
    (run / "samples" / ".part-00000-00009.parquet.tmp-1").write_bytes(b"half")
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2
    report = capsys.readouterr().out
    for name in ("part-00000-00001.parquet", "shapes-aesthetic.parquet", "model", "step-2", ".tmp-1"):
        assert name in report, report
    assert main(["run", "--config", str(world["config"]), "--run", str(run)]) == 0
    err = capsys.readouterr().err
    for said in ("generating chunk 1 again", "scoring it again", "training it again",
                 "step-2: damaged (random_states_0.pkl", "resuming from"):
        assert said in err, err[-3000:]
    assert outputs(run) == outputs(world["done"])
    assert main(["verify", "--run", str(run)]) == 0
