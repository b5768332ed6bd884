"""The memory report against a hand count on lenet5 (8x8 digits, 10 classes) at batch 2.

LeNet-5's parameters, (out, in, kh, kw) or (out, in), each with a bias of ``out``:

    conv1 features.0     6 x 1 x 5 x 5 =   150    bias   6
    conv2 features.3    16 x 6 x 5 x 5 =  2400    bias  16
    fc1   classifier.1       120 x 64  =  7680    bias 120
    fc2   classifier.3      84 x 120   = 10080    bias  84
    fc3   classifier.5       10 x 84   =   840    bias  10
                                         21150         236   -> 21386 parameters, 85544 bytes in fp32

Under mxfp8 (policies/mxfp8.yaml) every conv and linear reads input and weight in mxfp8_e4m3:
a byte an element and a byte of scale per block of up to 32. A conv weight's blocks run along
in_channels x kernel, a linear weight's along K (its rows), so the blocks are
6 x ceil(25/32) + 16 x ceil(150/32) + 120 x ceil(64/32) + 84 x ceil(120/32) + 10 x ceil(84/32)
= 6 + 80 + 240 + 336 + 30 = 692. Biases have no format.
"""
import json

import torch

import mpcompile
from mpcompile.cli import main
from mpcompile.models import build_model
from mpcompile.runtime.memory import CATEGORIES, memory_report

FP32_PARAMETERS = 21386 * 4
WEIGHTS, WEIGHT_BLOCKS, BIASES = 21150, 692, 236
# What autograd saves in one forward of a batch of 2, each storage once (bytes held in fp32;
# nominal: the format of the role under which the op that saves it reads it, the widest if two save it):
#   x                 2x1x8x8   = 128 floats   conv1 input: mxfp8, blocks along the 1 channel: 128 + 128
#   relu1 out         2x6x8x8   = 768 floats   relu1 output, maxpool1 input (no format): 3072
#   maxpool1 indices  2x6x4x4   = 192 int64    1536
#   maxpool1 out      2x6x4x4   = 192 floats   conv2 input: mxfp8, 32 positions x 1 block of 6 channels: 192 + 32
#   relu2 out         2x16x4x4  = 512 floats   relu2 output, maxpool2 input: 2048
#   maxpool2 indices  2x16x2x2  = 128 int64    1024
#   maxpool2 out      2x16x2x2  = 128 floats   fc1 input (flattened, a view: 2 x 64): mxfp8, 2 rows x 2 blocks: 128 + 4
#   relu3 out         2x120     = 240 floats   relu3 output (fp32) and fc2 input (mxfp8): 960
#   relu4 out         2x84      = 168 floats   relu4 output (fp32) and fc3 input (mxfp8): 672
ACTIVATIONS_HELD = 512 + 3072 + 1536 + 768 + 2048 + 1024 + 512 + 960 + 672
ACTIVATIONS_NOMINAL = 256 + 3072 + 1536 + 224 + 2048 + 1024 + 132 + 960 + 672
MXFP8_PACKED_SGD = """version: 1
name: mxfp8_lp
default: {input: mxfp8_e4m3, weight: mxfp8_e4m3, grad_output: mxfp8_e5m2}
optimizer: {kind: sgd, master: bf16, momentum: fp8_e4m3, storage: packed}
"""


def _lenet(policy: str, train: bool = True) -> mpcompile.CompiledModel:
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=8).train(train)
    return mpcompile.compile(model, policy, (torch.randn(2, 1, 8, 8),), calibration=[])


def test_mxfp8_sgd_matches_the_hand_count_and_leaves_the_model_alone():
    cm = _lenet("mxfp8", train=False)
    before = [p.detach().clone() for p in cm.parameters()]
    report = memory_report(cm, 2)
    assert ACTIVATIONS_HELD == 11104 and ACTIVATIONS_NOMINAL == 9924
    expected = {  # category: (nominal, held, fp32)
        "parameters": (WEIGHTS + WEIGHT_BLOCKS + 4 * BIASES, FP32_PARAMETERS, FP32_PARAMETERS),
        "master_weights": (4 * WEIGHTS, 0, 0),  # an fp32 copy of each mxfp8 weight; mpcompile updates in place
        "gradients": (FP32_PARAMETERS,) * 3,  # mxfp8 sets no grad_weight format
        "optimizer_states": (FP32_PARAMETERS,) * 3,  # SGD's momentum buffers, fp32
        "activations": (ACTIVATIONS_NOMINAL, ACTIVATIONS_HELD, ACTIVATIONS_HELD),
    }
    assert {c: (report[c].nominal, report[c].held, report[c].fp32) for c in CATEGORIES} == expected
    assert report.to_dict()["categories"]["activations"] == {"nominal": 9924, "held": 11104, "fp32": 11104}
    assert report.peak is None and report.measured_with.startswith("torch's MemTracker")
    assert cm.modes == ("eval",) and not cm.training  # the step ran on a copy, in train mode
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, cm.parameters()))


def test_bf16_master_and_packed_fp8_momentum():
    report = memory_report(_lenet(MXFP8_PACKED_SGD), 2)
    # biases are read as stored: their master bf16 copy is the parameter; each weight has a bf16 master copy
    assert (report["parameters"].nominal, report["parameters"].held) == (WEIGHTS + WEIGHT_BLOCKS + 2 * BIASES,
                                                                         FP32_PARAMETERS)
    # packed storage holds every parameter (biases too) as bf16 codes between steps
    assert (report["master_weights"].nominal, report["master_weights"].held) == (2 * WEIGHTS, 2 * (WEIGHTS + BIASES))
    # momentum packed as uint8 codes of fp8_e4m3: a byte an element, held as such
    assert (report["optimizer_states"].nominal, report["optimizer_states"].held,
            report["optimizer_states"].fp32) == (21386, 21386, FP32_PARAMETERS)
    assert report["activations"].held == ACTIVATIONS_HELD


def test_cli_memory_prints_the_report(capsys):
    args = ["memory", "lenet5", "--policy", "mxfp8", "--batch", "2", "--input-shape", "1,1,8,8"]
    assert main(args + ["--optimizer", "adam", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch_size"] == 2 and list(out["categories"]) == list(CATEGORIES)
    # Adam: exp_avg and exp_avg_sq in fp32, and a float32 step count per parameter tensor (10)
    assert out["categories"]["optimizer_states"] == {"nominal": 2 * FP32_PARAMETERS + 40,
                                                     "held": 2 * FP32_PARAMETERS + 40, "fp32": 2 * FP32_PARAMETERS + 40}
    assert out["categories"]["activations"]["held"] == ACTIVATIONS_HELD
    assert main(args[:-2] + ["--input-shape", "1,1,8,8,x"]) == 2
    assert "comma-separated sizes" in capsys.readouterr().err
