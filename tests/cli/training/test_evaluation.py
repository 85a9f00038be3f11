import json
from dataclasses import replace

import torch
from typer.testing import CliRunner

from querydet_models.checkpoint import save_checkpoint
from querydet_models.detectors.querydet import build_querydet
from querydet_cli.app import app
from querydet_cli.core.config import load_config
from querydet_cli.core.errors import QueryDetError
from querydet_cli.training.evaluation import evaluate, plot_tradeoff, save_visualisations
from querydet_cli.training.train import load_split

runner = CliRunner()


def tiny(tmp_path):
    cfg = load_config("querydet_mobilenet_synthetic")
    cfg = replace(cfg, model=replace(cfg.model, backbone="resnet18", fpn_channels=16, head_convs=2),
                  data=replace(cfg.data, synthetic_val_scenes=2, synthetic_size=96),
                  train=replace(cfg.train, test_short_side=96, max_size=96))
    torch.manual_seed(0)
    model = build_querydet(cfg.model, cfg.inference).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg.to_dict(), list(cfg.class_names))
    return model, cfg, path


def test_evaluate_sweeps_sigma_and_plots(tmp_path):
    model, cfg, _ = tiny(tmp_path)
    samples, _, _ = load_split(cfg, "val", tmp_path)
    for protocol, key in (("coco", "APs"), ("visdrone", "AR500")):
        report = evaluate(model, cfg, samples, protocol=protocol, sigmas=[0.0, 0.5],
                          device=torch.device("cpu"), quiet=True)
        assert [r["run"] for r in report["rows"]] == ["dense", "csq sigma=0", "csq sigma=0.5"]
        assert all(key in r and r["images_per_s"] > 0 for r in report["rows"])
    # sigma 0 with exact context reproduces dense detections, hence the same metrics
    assert report["rows"][0]["AP"] == report["rows"][1]["AP"]
    plot_tradeoff(report, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    paths = save_visualisations(model, cfg, samples, tmp_path / "vis", torch.device("cpu"), 0.1)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_eval_cli_writes_report(tmp_path):
    _, _, weights = tiny(tmp_path)
    result = runner.invoke(app, ["eval", "--weights", str(weights), "--sigma", "0.1",
                                 "--out", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["protocol"] == "coco" and len(report["rows"]) == 2
    assert (tmp_path / "ev" / "report.json").is_file() and (tmp_path / "ev" / "tradeoff.png").is_file()


def test_cli_bad_inputs_raise_user_errors(tmp_path):
    _, _, weights = tiny(tmp_path)
    cases = [
        ["eval", "--weights", str(weights), "--sigma", "abc"],
        ["eval", "--weights", str(weights), "--sigma", "1.5"],
        ["eval", "--weights", str(tmp_path / "missing.pt")],
        ["tile", "--out", str(tmp_path / "t")],
        ["tile", "--out", str(tmp_path / "t"), "--annotations", str(tmp_path / "none.json")],
        ["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")],
        ["train", "--resume", "--out", str(tmp_path / "empty_run")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert isinstance(result.exception, QueryDetError), (args, result.output)
    # choice options are enums: click rejects a bad value as a usage error (exit 2)
    for args in (["eval", "--weights", str(weights), "--protocol", "pascal"],
                 ["train", "--dataset", "imagenet", "--out", str(tmp_path / "r")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Invalid value" in result.output, args


def test_data_options_the_dataset_would_not_read_are_refused(tmp_path):
    """A COCO file given to a run whose dataset is synthetic was silently ignored: train went on
    generating scenes and eval reported on them. Both now refuse in one line, before creating
    anything."""
    _, _, weights = tiny(tmp_path)  # its config's dataset is synthetic
    cases = [
        ["train", "--train-annotations", str(tmp_path / "chips.json"), "--out", str(tmp_path / "r")],
        ["train", "--val-annotations", str(tmp_path / "val.json"), "--out", str(tmp_path / "r")],
        ["eval", "--weights", str(weights), "--val-annotations", str(tmp_path / "val.json"),
         "--out", str(tmp_path / "e")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert isinstance(result.exception, QueryDetError), (args, result.output)
        assert "add --dataset coco" in str(result.exception)
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()
