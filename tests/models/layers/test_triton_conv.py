"""The fused Triton sparse convolution, checked without a GPU in Triton's interpreter
(TRITON_INTERPRET=1, set in a child process before Triton builds anything): against the
gather-GEMM at every row, on small shapes: empty, full, map borders, rows past a block, several
images, channels not a multiple of the block, fp32 and bf16; and a whole CSQ forward with
`backend="triton"` against the dense heads at the keys."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent('''
    import json, torch
    from torch import nn
    from querydet_models.layers.sparse import TowerPlan, conv_weight_as_gemm, sparse_conv_torch
    from querydet_models.layers.triton_conv import sparse_conv_triton

    torch.manual_seed(0)
    worst = {}
    shape = (2, 9, 11)  # two images; 9 x 11 positions each
    n_all = 2 * 9 * 11
    cases = {"empty": torch.zeros(0, dtype=torch.int64), "one": torch.tensor([0]),
             "border": torch.tensor([10, 98, 197]), "full": torch.arange(n_all),
             "scattered": torch.randperm(n_all)[:40].sort().values}
    for name, keys in cases.items():
        plan = TowerPlan.exact(keys, shape, depth=2)
        conv = nn.Conv2d(20, 36, 3, padding=1)  # channels past one block, not multiples of it
        x = torch.randn(plan.sets[0].numel(), 20)
        for dtype in (torch.float32, torch.bfloat16):
            ref = torch.relu(sparse_conv_torch(x.to(dtype), plan, 1, conv.to(dtype)))
            got = sparse_conv_triton(x.to(dtype), plan.neighbours(1), conv_weight_as_gemm(conv).to(dtype),
                                     conv.bias.to(dtype), relu=True)
            assert got.shape == ref.shape and got.dtype == dtype, (name, got.shape, ref.shape)
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)) \\
                if ref.numel() else 0.0
            worst[f"{name}-{dtype}"] = err
        conv.float()
    # a whole CSQ forward on the fused backend against the dense heads at the keys
    from tests.conftest import tiny_model, with_random_heads
    from tests.models.detectors.test_querydet import features, rel_err
    model = with_random_heads(tiny_model())
    images = torch.rand(2, 3, 160, 192, generator=torch.Generator().manual_seed(3))
    feats, _ = features(model, images)
    dense = model.predict_levels(feats, mode="ccq", sigma=0.0)
    sparse = model.predict_levels(feats, mode="csq", sigma=0.5, backend="triton",
                                  sparse_max_fraction=1.0)
    assert sparse[0].positions.numel() > 0
    worst["csq-forward"] = rel_err(sparse, dense)
    print(json.dumps(worst))
''')


def test_the_fused_kernel_equals_the_gather_gemm_in_the_interpreter():
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    worst = json.loads(run.stdout.strip().splitlines()[-1])
    for name, err in worst.items():
        assert err < (2e-2 if "bfloat16" in name else 1e-5), (name, err)
    assert worst["empty-torch.float32"] == 0.0 and worst["csq-forward"] < 1e-4


def test_the_triton_backend_is_refused_where_it_cannot_run():
    import torch

    from querydet_models.layers.sparse import resolve_backend

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs it anywhere")
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        resolve_backend("triton", torch.device("cpu"))


def test_detect_refuses_a_backend_that_cannot_run_here_in_one_line(tmp_path):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs it anywhere")
    from querydet_cli.core.resources import sample_scene

    run = subprocess.run([sys.executable, "-m", "querydet_cli", "detect", str(sample_scene()),
                          "-o", str(tmp_path / "x.csv"), "--backend", "triton"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and "--backend triton: the triton backend runs on CUDA" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
