import dataclasses

import pytest
import yaml

from querydet_models.config import InferenceConfig, ModelConfig
from querydet_models.detectors.querydet import build_querydet
from querydet_cli.core.config import Config, DataConfig, TrainConfig, load_config
from querydet_cli.core.resources import config_names, config_path
from querydet_cli.core.errors import QueryDetError

FILES = [config_path(name) for name in config_names()]


def test_there_are_configs():
    assert len(FILES) >= 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_config_loads_complete_and_builds(path):
    cfg = load_config(path)
    data = yaml.safe_load(path.read_text())
    # complete files: every field spelled out, no hidden defaults
    assert set(data) == {f.name for f in dataclasses.fields(Config)}
    assert set(data["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(data["inference"]) == {f.name for f in dataclasses.fields(InferenceConfig)}
    assert set(data["data"]) == {f.name for f in dataclasses.fields(DataConfig)}
    assert set(data["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(cfg.names()) == cfg.model.num_classes
    # start weights (ImageNet for the R50 configs) are loaded in their own, offline tests
    build_querydet(dataclasses.replace(cfg.model, backbone_weights=None), cfg.inference)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: resnet50\n  levles: [2, 3]\n")
    with pytest.raises(QueryDetError, match="model.levles: unknown key"):
        load_config(p)


def test_bad_value_names_allowed_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inference:\n  mode: turbo\n")
    with pytest.raises(QueryDetError, match="inference.mode.*allowed: dense, csq, cq, ccq"):
        load_config(p)
    p.write_text("model:\n  backbone: vgg16\n")
    with pytest.raises(QueryDetError, match="model.backbone.*resnet50"):
        load_config(p)
    p.write_text("inference:\n  sigma: .nan\n")
    with pytest.raises(QueryDetError, match="finite"):
        load_config(p)


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(QueryDetError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(QueryDetError, match="not valid YAML"):
        load_config(p)


def test_bare_name_resolves_to_configs_dir():
    assert load_config("querydet_r50_visdrone").inference.max_detections == 500


def test_detector_family_values_are_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  detector: yolo\n")
    with pytest.raises(QueryDetError, match="model.detector.*allowed: retinanet, fcos, faster_rcnn"):
        load_config(p)
    # the RPN runs on P2-P6: a RetinaNet level list is refused, naming the key
    p.write_text("model:\n  detector: faster_rcnn\n  levels: [2, 3, 4, 5, 6, 7]\n"
                 "  level_weights: [1, 1, 1, 1, 1, 1]\n")
    with pytest.raises(QueryDetError, match=r"model.levels.*\[2, 3, 4, 5, 6\] for faster_rcnn"):
        load_config(p)
    p.write_text("model:\n  roi_head_channels: 0\n")
    with pytest.raises(QueryDetError, match="model.roi_head_channels"):
        load_config(p)
