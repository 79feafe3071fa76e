"""The quality benchmark's bookkeeping: one run per (variant, seed), a mean and sd row per variant.

The runs themselves (minutes each) are replaced by a stand-in returning fixed figures, so this
checks what the benchmark prints and writes from given results, not the training.
"""
import csv
import importlib.util
import os

import pytest

from conftest import ROOT


def load_bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", os.path.join(ROOT, "benchmarks", "bench_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quality_runs_every_seed_and_prints_mean_and_sd(tmp_path, monkeypatch, capsys):
    bench = load_bench_quality()
    iou = {0: 0.949, 1: 0.953, 2: 0.951}
    calls = []

    def fake_run(name, seed, args, train_db, test_db, images):
        calls.append((name, seed))
        return {"steps": args.steps, "train_s": 590.0 + seed, "infer_s": 9.0, "iou_fg": iou[seed],
                "dice_fg": 0.97, "pixel_accuracy": 0.98, "iou_fg_tta": 0.955, "dice_fg_tta": 0.977}

    monkeypatch.setattr(bench, "build", lambda data, out: ("train.lmdb", "test.lmdb"))
    monkeypatch.setattr(bench, "test_image_folder", lambda data, out: "images")
    monkeypatch.setattr(bench, "run_variant", fake_run)
    out = tmp_path / "out"
    assert bench.main(["--data", str(tmp_path), "--output_dir", str(out), "--variants", "unet", "unet-noaug",
                       "--seeds", "0", "1", "2", "--steps", "7"]) == 0
    assert calls == [("unet", 0), ("unet", 1), ("unet", 2), ("unet-noaug", 0), ("unet-noaug", 1), ("unet-noaug", 2)]
    lines = capsys.readouterr().out.splitlines()
    mean_rows = [line.split() for line in lines if line.split()[1:2] == ["mean"]]
    assert [row[0] for row in mean_rows] == ["unet", "unet-noaug"]
    # mean row: variant, "mean", steps, train s, IoU, Dice, accuracy, IoU tta, Dice tta
    assert mean_rows[0][2] == "7" and float(mean_rows[0][3]) == 591 and float(mean_rows[0][4]) == pytest.approx(0.951)
    sd_rows = [line.split() for line in lines if line.split()[:1] == ["sd"]]
    assert float(sd_rows[0][1]) == 1 and float(sd_rows[0][2]) == pytest.approx(0.002, abs=1e-4)  # sd, train s, IoU
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["variant"], r["seed"], float(r["iou_fg"])) for r in rows][:3] == [
        ("unet", "0", 0.949), ("unet", "1", 0.953), ("unet", "2", 0.951)]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_bench_quality_one_seed_prints_no_mean_row(tmp_path, monkeypatch, capsys):
    bench = load_bench_quality()
    monkeypatch.setattr(bench, "build", lambda data, out: ("train.lmdb", "test.lmdb"))
    monkeypatch.setattr(bench, "test_image_folder", lambda data, out: "images")
    monkeypatch.setattr(bench, "run_variant", lambda *a: {
        "steps": 5, "train_s": 1.0, "infer_s": 1.0, "iou_fg": 0.5, "dice_fg": 0.6, "pixel_accuracy": 0.7,
        "iou_fg_tta": float("nan"), "dice_fg_tta": float("nan")})
    assert bench.main(["--data", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--variants", "unet",
                       "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert " mean " not in out and "unet" in out
