import pytest
import torch

from querydet_models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from querydet_models.detectors.querydet import ModelInputError
from querydet_models.layers.sparse import spconv_available
from tests.conftest import randomize, tiny_model

BACKENDS = ["torch", "blocks"] + (["spconv"] if spconv_available() else [])


def features(model, images):
    batch, sizes = model.preprocess(images)
    return model.extract_features(batch), sizes


def test_per_level_output_shapes(model, images):
    feats, _ = features(model, images)
    assert feats.levels == (2, 3, 4, 5, 6, 7)
    outs = model.predict_levels(feats, mode="dense")
    for out, lvl in zip(outs, feats.levels):
        N, C, H, W = feats.dense(lvl).shape
        assert feats.shape(lvl) == (N, H, W) and C == 32
        assert out.shape == (2, H, W)
        assert H == -(-192 // 2 ** lvl) or H == -(-160 // 2 ** lvl)
        assert out.cls.shape == (N * H * W, 9 * 3)
        assert out.box.shape == (N * H * W, 9 * 4)


def rel_err(sparse, dense):
    worst = 0.0
    for s, d in zip(sparse, dense):
        if s.positions.numel() == 0:
            continue
        pairs = [(s.cls, d.cls[s.positions]), (s.box, d.box[s.positions])]
        if s.query is not None:
            pairs.append((s.query, d.query[s.positions]))
        for a, b in pairs:
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def sparse_and_dense(model, images, mode, backend, sigma):
    """Level outputs of a sparse mode (exact context) and of the dense heads, after checking that
    the two finest levels are genuinely sparse and equal the dense heads at every key."""
    feats, _ = features(model, images)
    reference = model.predict_levels(feats, mode="ccq", sigma=0.0)
    outs = model.predict_levels(feats, mode=mode, sigma=sigma, context="exact", backend=backend,
                                sparse_max_fraction=1.0)
    keys = [o.positions.numel() for o in outs]
    full = [r.positions.numel() for r in reference]
    assert 0 < keys[0] < full[0] and 0 < keys[1] < full[1]  # genuinely sparse, not empty
    assert rel_err(outs, reference) < 1e-4
    return outs, reference


@pytest.mark.parametrize("mode,backend", [("csq", b) for b in BACKENDS] + [("cq", "torch"),
                                                                          ("ccq", "torch")])
def test_sparse_modes_equal_dense_heads_at_keys(model, images, mode, backend):
    outs, reference = sparse_and_dense(model, images, mode, backend, sigma=0.5)
    assert [o.positions.numel() for o in outs[2:]] == [r.positions.numel() for r in reference[2:]]
    # both images of the batch have keys
    N, H, W = outs[0].shape
    assert set((outs[0].positions // (H * W)).tolist()) == {0, 1}


def test_paper_context_is_approximate(model, images):
    feats, _ = features(model, images)
    reference = model.predict_levels(feats, mode="ccq", sigma=0.0)
    outs = model.predict_levels(feats, mode="csq", sigma=0.5, context="3x3", backend="torch")
    assert rel_err(outs, reference) > 1e-3


def test_sigma_zero_exact_gives_dense_detections(model, images):
    dense = model.forward_inference(images, mode="dense")
    csq = model.forward_inference(images, mode="csq", sigma=0.0, context="exact",
                                  sparse_max_fraction=1.0)
    for d, c in zip(dense, csq):
        assert d["boxes"].shape[0] > 0
        assert torch.equal(d["labels"], c["labels"])
        assert torch.allclose(d["boxes"], c["boxes"], atol=1e-3)
        assert torch.allclose(d["scores"], c["scores"], atol=1e-5)


def test_sigma_above_every_score_leaves_only_coarse_levels(model, images):
    dets = model.forward_inference(images, mode="csq", sigma=1.0)
    for d in dets:
        assert d["levels"].numel() > 0
        assert d["levels"].min() >= 4
    dense = model.forward_inference(images, mode="dense")
    assert any((d["levels"] < 4).any() for d in dense)


def test_start_level_choices(model, images):
    feats, _ = features(model, images)
    reference = model.predict_levels(feats, mode="ccq", sigma=0.0, start_level=5)
    for start in (3, 5):
        outs = model.predict_levels(feats, mode="csq", sigma=0.5, start_level=start,
                                    sparse_max_fraction=1.0)
        assert [o.is_dense for o in outs] == [lvl >= start for lvl in range(2, 8)]
        if start == 5:
            assert rel_err(outs, reference) < 1e-4
    with pytest.raises(ValueError, match="start level"):
        model.predict_levels(feats, mode="csq", start_level=2)


def test_detection_dict_format(model, images):
    for d in model.forward_inference(images):
        assert d["boxes"].dtype == torch.float32 and d["boxes"].shape[1] == 4
        assert d["labels"].dtype == torch.int64
        assert d["scores"].shape == d["labels"].shape
        assert (d["boxes"][:, 2] >= d["boxes"][:, 0]).all()
        assert d["boxes"][:, 2].max() <= 192 and d["boxes"][:, 3].max() <= 160


@pytest.mark.parametrize("bad,match", [
    (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf")])
def test_nan_inf_images_rejected(model, bad, match):
    img = torch.rand(1, 3, 64, 64)
    img[0, 1, 5, 5] = bad
    with pytest.raises(ModelInputError, match=match):
        model.forward_inference(img)


def test_empty_and_wrong_shape_images_rejected(model):
    with pytest.raises(ModelInputError, match="empty"):
        model.forward_inference([torch.rand(3, 0, 10)])
    with pytest.raises(ModelInputError, match="shape"):
        model.forward_inference(torch.rand(3, 64, 64))
    with pytest.raises(ModelInputError, match="float"):
        model.forward_inference(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_degenerate_target_box_rejected():
    m = tiny_model().train()
    with pytest.raises(ModelInputError, match="degenerate"):
        m(torch.rand(1, 3, 64, 64), [{"boxes": torch.tensor([[5.0, 5, 5, 9]]),
                                      "labels": torch.tensor([0])}])


def test_baseline_p3_p7_is_dense_only():
    m = tiny_model(levels=(3, 4, 5, 6, 7), level_weights=(1.0,) * 5, query_levels=())
    assert m.query_head is None
    dets = m.forward_inference(torch.rand(1, 3, 64, 64), mode="csq")
    assert dets[0]["levels"].numel() == 0 or dets[0]["levels"].min() >= 3


def test_checkpoint_round_trip(tmp_path, model, images):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"model": {"num_classes": 3}}, ["a", "b", "c"])
    payload = load_checkpoint(path)
    assert payload["class_names"] == ["a", "b", "c"]
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(payload["model"])
    a = model.forward_inference(images, mode="dense")
    b = fresh.forward_inference(images, mode="dense")
    assert torch.equal(a[0]["boxes"], b[0]["boxes"])


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(junk)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2", "resnet34"])
def test_light_backbones_build_and_run(name):
    m = tiny_model(backbone=name)
    randomize(m.head)
    images = torch.rand(1, 3, 64, 96)
    sparse = m.forward_inference(images, mode="csq", sigma=0.0)[0]  # every query fires
    dense = m.forward_inference(images, mode="dense")[0]
    assert sparse["boxes"].shape[1] == 4 and len(sparse["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):  # exact CSQ with all queries: the dense answer
        assert torch.allclose(sparse[key].float(), dense[key].float(), atol=1e-4), key


def test_csq_never_builds_dense_maps_of_queried_levels(model, images):
    feats, _ = features(model, images)
    outs = model.predict_levels(feats, mode="csq", sigma=0.5, sparse_max_fraction=1.0)
    assert outs[0].positions.numel() > 0
    assert [feats.is_dense(lvl) for lvl in feats.levels] == [False, False, True, True, True, True]


def test_dense_fallback_when_keys_cover_most_of_a_level(model, images):
    feats, _ = features(model, images)
    reference = model.predict_levels(feats, mode="ccq", sigma=0.0)
    feats, _ = features(model, images)
    outs = model.predict_levels(feats, mode="csq", sigma=0.0, sparse_max_fraction=0.3)
    assert feats.is_dense(2) and feats.is_dense(3)  # every position queried: ran densely
    assert outs[0].macs == outs[0].dense_macs
    assert rel_err(outs, reference) < 1e-4


def test_a_per_call_score_threshold_leaves_the_model_as_it_was(model, images):
    before = model.inference
    with torch.no_grad():
        batch, sizes = model.preprocess(list(images))
        feats = model.extract_features(batch)
        levels = model.predict_levels(feats, mode="dense")
        low = model.detections(levels, sizes, feats, score_threshold=0.0)
        high = model.detections(levels, sizes, feats, score_threshold=0.99)
    assert model.inference == before
    assert sum(len(d["scores"]) for d in low) > sum(len(d["scores"]) for d in high)
    assert all((d["scores"] >= 0.99).all() for d in high)


@pytest.mark.parametrize("channels_last", [False, True])
def test_preprocess_normalises_into_the_padded_batch_exactly(channels_last):
    """Normalised straight into the batch: bit for bit (img - mean) / std in float32 for
    float32 and float16 images, float64 ones rounded once as before, zeros in the padding."""
    model = tiny_model()
    model.channels_last = channels_last
    gen = torch.Generator().manual_seed(7)
    images = [torch.rand(3, 70, 90, generator=gen), torch.rand(3, 64, 40, generator=gen).half(),
              torch.rand(3, 50, 96, generator=gen, dtype=torch.float64)]
    with torch.inference_mode():
        batch, sizes = model.preprocess(images)
    assert sizes == [(70, 90), (64, 40), (50, 96)] and batch.shape == (3, 3, 96, 96)
    assert batch.is_contiguous(memory_format=torch.channels_last) == channels_last
    mean, std = model.pixel_mean[0], model.pixel_std[0]
    for i, img in enumerate(images):
        h, w = sizes[i]
        want = ((img - mean) / std).float()
        assert torch.equal(batch[i, :, :h, :w], want)
        assert not batch[i, :, h:].any() and not batch[i, :, :, w:].any()


def test_gathered_blocks_in_chunks_and_in_bf16_equal_the_dense_heads(model, images, monkeypatch):
    """The blocks backend (SBNet-style): blocks at the maps' borders, keys of several chunks of
    blocks put back in their order, and bf16 against the dense heads in bf16."""
    import querydet_models.query.query_infer as qi

    monkeypatch.setattr(qi, "CROP_BATCH", 2)
    outs, reference = sparse_and_dense(model, images, "csq", "blocks", sigma=0.5)
    n, h, w = outs[0].shape
    ys = (outs[0].positions % (h * w)) // w
    assert ys.max() >= h - qi.BLOCK and outs[0].positions.numel() > 2 * qi.BLOCK  # borders, chunks
    feats, _ = features(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model.predict_levels(feats, mode="ccq", sigma=0.0)
        sparse = model.predict_levels(feats, mode="csq", sigma=0.5, backend="blocks",
                                      sparse_max_fraction=1.0)
    assert rel_err(sparse, dense) < 2e-2
