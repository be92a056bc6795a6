"""SCN-style training scripts (tests/scn_scripts/) written with only the porting rule's
imports (docs/porting_from_scn.md): each trains two steps, its loss falls over 20 steps
on a fixed batch, and no script imports anything the rule does not map to.

The scripts are SparseConvNet users' code, not the library's: each exercises what one of
SCN's examples relies on (hello world; Assamese VGG+ through ClassificationTrainValidate;
Chinese VGG-C with a stride-2 convolution; 3-D segmentation UNet and
FullyConvolutionalNet; ScanNet's 4096^3 UNet with Adam and checkpoints; NYU2's
ShrinkScatter network).
"""

import ast
import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

SCRIPTS = pathlib.Path(__file__).parent / "scn_scripts"

# Small batches: two steps of each run in well under 10 s on two shared cores.
SMALL = {
    "hello_world": {"batch_size": 2},
    "assamese_vggplus": {"batch_size": 12, "val_batch_size": 12},
    "chinese_vggc": {"batch_size": 12},
    "segmentation_unet": {"batch_size": 2, "n_points": 800, "m": 8},
    "fully_convolutional": {"batch_size": 2, "n_points": 800, "m": 8},
    "scannet_unet": {"batch_size": 1, "n_points": 3000, "n_scenes": 2, "steps_per_epoch": 1},
    "nyu2_shrinkscatter": {"batch_size": 1, "pixel_step": 16, "depth": 6, "n_frames": 2,
                           "steps_per_epoch": 1},
}
# What each script must print (SCN's lines).
PRINTS = {
    "hello_world": ["Input SparseConvNetTensor:", "(2, 32, 10, 10) torch.FloatTensor",
                    "#parameters 19978", "2 train loss"],
    "assamese_vggplus": ["Input spatial size: [95 95] Data scale: 63", "1 train: top1=",
                         "2 test:  top1=", "MultiplyAdds/sample"],
    "chinese_vggc": ["Input spatial size: [63 63] Data scale: 63", "1 train: top1="],
    "segmentation_unet": ["train epoch 1 1 iou=", "MegaMulAdd="],
    "fully_convolutional": ["train epoch 1 1 iou=", "MegaMulAdd="],
    "scannet_unet": ["1 Train loss", "2 Train loss", "1 1 Val MegaMulAdd=", "mean IOU"],
    "nyu2_shrinkscatter": ["train epoch 1", "test epoch 1", "test epoch 2"],
}

# The porting rule's modules (and the standard library's, and the scripts' own data
# modules, as SCN's examples import their data.py).
ALLOWED = {"numpy", "sparsegrid.nn", "sparsegrid.nn.functional", "sparsegrid.nn.optim",
           "sparsegrid.autodiff", "sparsegrid.backend"}
STDLIB = {"math", "os", "sys", "time", "glob", "collections"}
SIBLINGS = {p.stem for p in SCRIPTS.glob("*.py")}


@pytest.fixture(scope="module", autouse=True)
def scripts_on_path():
    """The scripts' folder on sys.path while this file runs (they import their data
    modules by name, as SCN's examples run from their own folder); afterwards the folder
    and every module loaded from it are gone again."""
    sys.path.insert(0, str(SCRIPTS))
    yield
    sys.path.remove(str(SCRIPTS))
    for name in [n for n, m in list(sys.modules.items())
                 if str(getattr(m, "__file__", None) or "").startswith(str(SCRIPTS))]:
        del sys.modules[name]


def load(name):
    """Import tests/scn_scripts/<name>.py (once)."""
    module = sys.modules.get(name)
    if module is not None and str(getattr(module, "__file__", "")).startswith(str(SCRIPTS)):
        return module
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(name, steps, tmp_path, monkeypatch, **options):
    """``main(steps, ...)`` of a script in a fresh working directory (the scripts write
    SCN's files -- confusion matrices, checkpoints -- where they run)."""
    monkeypatch.chdir(tmp_path)
    options = {**SMALL[name], **options}
    if name == "scannet_unet":
        options.setdefault("exp_name", str(tmp_path / "unet_scale20_m16"))
    result = load(name).main(steps, **options)
    if name == "assamese_vggplus":                     # the history of the epochs
        return [epoch["train"]["nll"] for epoch in result]
    return result


@pytest.mark.parametrize("name", sorted(SMALL))
def test_script_trains_two_steps(name, tmp_path, monkeypatch, capsys):
    losses = run(name, 2, tmp_path, monkeypatch)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    out = capsys.readouterr().out
    for line in PRINTS[name]:
        assert line in out, f"{name} did not print {line!r}:\n{out}"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_script_loss_falls_on_a_fixed_batch(name, tmp_path, monkeypatch):
    losses = run(name, 20, tmp_path, monkeypatch, fixed_batch=True)
    assert len(losses) == 20
    # the last five steps' mean clearly below the first step's loss (ScanNet's Adam at
    # its default rate 1e-3 moves slowest: about 0.75 here; the others reach 0.1-0.5)
    assert np.mean(losses[-5:]) < (0.9 if name == "scannet_unet" else 0.6) * losses[0], \
        losses
    assert losses[-1] < losses[10] < losses[0], losses


def test_assamese_writes_scn_files_and_counts(tmp_path, monkeypatch):
    history = load("assamese_vggplus")
    monkeypatch.chdir(tmp_path)
    result = history.main(1, **SMALL["assamese_vggplus"])
    assert [h["epoch"] for h in result] == [1]
    for which in ("train", "test"):
        assert (tmp_path / f"{which} confusion matrix.csv").is_file()
        png = (tmp_path / f"{which} confusion matrix.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        cm = np.loadtxt(tmp_path / f"{which} confusion matrix.csv", delimiter=",")
        assert cm.shape == (183, 183)
        n = SMALL["assamese_vggplus"]["batch_size" if which == "train" else "val_batch_size"]
        np.testing.assert_allclose(cm.sum(), n, rtol=1e-5)     # one softmax per sample


def test_scannet_checkpoints_resume_where_they_stopped(tmp_path, monkeypatch, capsys):
    import sparsegrid.nn as scn
    exp = str(tmp_path / "exp")
    assert len(run("scannet_unet", 2, tmp_path, monkeypatch, exp_name=exp)) == 2
    files = sorted(p.name for p in tmp_path.glob("exp-*-unet.pth"))
    assert files == ["exp-000000001-unet.pth", "exp-000000002-unet.pth"]
    capsys.readouterr()
    # three epochs asked for, two done: only the third runs, from epoch 2's weights
    assert len(run("scannet_unet", 3, tmp_path, monkeypatch, exp_name=exp)) == 1
    out = capsys.readouterr().out
    assert "Restore from " + exp + "-000000002-unet.pth" in out and "3 Train loss" in out
    # epoch 2 is a power of two: kept; epoch 3's file is the latest
    assert (tmp_path / "exp-000000002-unet.pth").is_file()
    model = load("scannet_unet").Model()
    assert scn.checkpoint_restore(model, exp, "unet", False) == 4


def test_prepare_BLInput_features_take_the_torch_calls_scripts_make():
    """Regression (SCN's hello world: ``batch[1] = batch[1].to(device)``): the features
    prepare_BLInput returns are a Tensor recording nothing, as SCN's torch tensor built
    under no_grad; the locations stay an int64 array (SCN's coordinates stay on the host)."""
    import sparsegrid.nn as scn
    from sparsegrid.autodiff import Tensor
    samples = [[np.array([[0, 1], [2, 3]]), Tensor(np.ones((2, 1), np.float32),
                                                   requires_grad=True)],
               [np.array([[4, 4]]), np.full((1, 1), 2.0, np.float32)]]
    batch = scn.prepare_BLInput(samples)
    assert isinstance(batch[0], np.ndarray) and batch[0].dtype == np.int64
    assert isinstance(batch[1], Tensor) and not batch[1].requires_grad
    assert batch[1]._vjp is None                       # no graph back to the samples
    batch[1] = batch[1].to("cpu")
    assert batch[1].type() == "torch.FloatTensor"
    np.testing.assert_array_equal(batch[1].numpy()[:, :, 0], [[1, 1], [2, 0]])
    x = scn.BLInputLayer(2, 8)(batch)
    assert x.n_active == 3 and x.batch_size() == 2
    np.testing.assert_array_equal(x.get_spatial_locations(),
                                  [[0, 1, 0], [2, 3, 0], [4, 4, 1]])


def scripts():
    return sorted(SCRIPTS.glob("*.py"))


def test_there_are_scripts_for_each_scn_example():
    assert set(SMALL) <= {p.stem for p in scripts()}
    assert len(SMALL) >= 5


def outside_the_rule(source, filename="<script>"):
    """The imports and ``torch.`` / ``sparseconvnet.`` uses in ``source`` that the porting
    rule does not give, as 'line: what' strings."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." * node.level + (node.module or "")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in ("torch", "sparseconvnet"):
            problems.append(f"{node.lineno}: uses {node.value.id}.{node.attr}")
            continue
        else:
            continue
        problems += [f"{node.lineno}: imports {name}" for name in names
                     if name not in ALLOWED | STDLIB | SIBLINGS]
    return problems


def test_the_import_check_can_fail():
    assert outside_the_rule("import sparsegrid.nn as scn\nimport numpy as np") == []
    assert outside_the_rule("import torch") == ["1: imports torch"]
    assert outside_the_rule("import torch.nn as nn") == ["1: imports torch.nn"]
    assert outside_the_rule("import sparseconvnet as scn") == ["1: imports sparseconvnet"]
    assert outside_the_rule("from torch import optim") == ["1: imports torch"]
    assert outside_the_rule("import sparsegrid as sg") == ["1: imports sparsegrid"]
    assert outside_the_rule("from . import data") == ["1: imports ."]
    assert outside_the_rule("x = 1\ny = torch.cuda.is_available()") == \
        ["2: uses torch.cuda"]


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_scripts_use_only_the_porting_rules_imports(path):
    assert outside_the_rule(path.read_text(), str(path)) == []
