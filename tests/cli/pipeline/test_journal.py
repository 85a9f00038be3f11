"""The journal (journal.py, identity.py): an interrupted run leaves no output and --resume finishes
it as one uninterrupted run would; a journal of another run or format is not continued."""

import pytest
from rasterio.transform import Affine

from querydet_cli.pipeline.detect import DetectInterrupted, DetectOptions, run_detect

from tests.cli.oracle import OracleModel, paint, read_ndjson, write_tif
from tests.cli.pipeline.test_detect import CFG, CPU, OBJECTS, _boxes, _sample_run, replace_opts


def test_interrupted_run_leaves_no_output_and_resume_finishes(tmp_path):
    path = write_tif(tmp_path / "a.tif", paint(300, 260, OBJECTS), Affine(0.5, 0, 1000, 0, -0.5, 2000))
    out = tmp_path / "out.ndjson"
    opts = DetectOptions(tile_size=128, overlap=32, batch_size=1)
    with pytest.raises(DetectInterrupted, match=r"after \d+/\d+ tile rows") as info:
        run_detect(OracleModel(fail_after=5), CFG, [str(path)], str(out), "ndjson", opts, CPU)
    assert info.value.exit_code == 130 and info.value.resumable
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out") or ".partial" in p.name]
    resumed = OracleModel()
    run_detect(resumed, CFG, [str(path)], str(out), "ndjson", replace_opts(opts, resume=True), CPU)
    assert resumed.calls < 9  # the finished tile rows were not redone
    records = read_ndjson(out)
    assert _boxes(records) == sorted(tuple(float(v) for v in o) for o in OBJECTS)


def test_resume_after_every_row_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C after each possible number of batches (so after every tile row and inside rows),
    then --resume: the output equals an uninterrupted run's, objects on row seams included."""
    # 128 px tiles overlapping by 32 on 400 x 420 px: 4 tile rows (seams near y = 96..128, ...)
    objects = [(20, 90, 60, 135), (150, 185, 200, 230), (260, 280, 330, 330), (40, 300, 90, 410),
               (300, 20, 390, 60), (110, 100, 140, 125)]
    path = write_tif(tmp_path / "a.tif", paint(400, 420, objects), Affine(1, 0, 0, 0, -1, 0))
    opts = DetectOptions(tile_size=128, overlap=32, batch_size=2)
    full = tmp_path / "full.ndjson"
    reference = OracleModel()
    run_detect(reference, CFG, [str(path)], str(full), "ndjson", opts, CPU)
    expected = _boxes(read_ndjson(full))
    assert len(expected) == len(objects)
    for stop_after in range(1, reference.calls):
        out = tmp_path / f"r{stop_after}.ndjson"
        with pytest.raises(DetectInterrupted):
            run_detect(OracleModel(fail_after=stop_after), CFG, [str(path)], str(out), "ndjson",
                       opts, CPU)
        run_detect(OracleModel(), CFG, [str(path)], str(out), "ndjson",
                   replace_opts(opts, resume=True), CPU)
        assert _boxes(read_ndjson(out)) == expected, stop_after


def test_resume_with_two_workers_after_an_interrupt_equals_one_uninterrupted_run(tmp_path):
    import threading

    from querydet_cli.core.resources import sample_model
    from querydet_cli.runtimes.loading import load_model

    model, cfg = load_model(sample_model(), "cpu")
    reference = _sample_run(tmp_path, "reference", model, cfg, workers=1)
    real, calls, lock = model.predict_levels, [0], threading.Lock()

    def interrupted(*args, **kwargs):
        with lock:
            calls[0] += 1
            if calls[0] > 9:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.predict_levels = interrupted
    with pytest.raises(DetectInterrupted):
        _sample_run(tmp_path, "resumed", model, cfg, workers=2)
    model.predict_levels = real
    assert _sample_run(tmp_path, "resumed", model, cfg, workers=2, resume=True) == reference


def test_the_run_key_does_not_depend_on_workers():
    from querydet_cli.pipeline.identity import run_key

    keys = {run_key(["a.tif"], DetectOptions(workers=w, threads=t), CFG) for w, t in
            ((None, None), (1, 2), (2, 1), (4, 4))}
    assert len(keys) == 1


def test_a_journal_of_another_format_is_not_continued(monkeypatch):
    """Checkpoints now carry the tiles' valid masks: a journal written before (without them)
    has another run key, so --resume refuses it instead of checking fused boxes without masks."""
    from querydet_cli.pipeline import identity

    now = identity.run_key(["a.tif"], DetectOptions(), CFG)
    monkeypatch.setattr(identity, "JOURNAL_VERSION", identity.JOURNAL_VERSION - 1)
    assert identity.run_key(["a.tif"], DetectOptions(), CFG) != now
