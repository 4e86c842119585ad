"""Importing a user's ONNX model: every supported op trains as PyTorch trains it, the rest is refused
in one line naming the op, the node and what to do; user data formats load and are checked."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import byo
from hiertrain.train import data, models, onnxmodel
from hiertrain.errors import ConfigError
from hiertrain.train.reference import SingleProcess
from hiertrain.train.optim import OptimizerConfig

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.compute


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3)))).unsqueeze(-1).unsqueeze(-1)


class ViewFlatten(nn.Module):  # x.view(x.size(0), -1) after a transpose: a shape computed from the batch
    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], -1)


class Tokens(nn.Module):  # a ViT/Mixer stem and block: patches as tokens, LayerNorm over features, an MLP
    def __init__(self):
        super().__init__()
        self.patch, self.pos = nn.Conv2d(3, 8, 2, 2), nn.Parameter(torch.zeros(1, 4, 8))
        self.norm, self.mlp = nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head((x + self.mlp(self.norm(x))).mean(1))


class Attention(nn.Module):  # timm's ViT attention: heads by reshape/permute, softmax of q.k, unbind
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class ViT(Tokens):  # a pre-norm transformer block on the patch tokens
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(8), Attention()

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.attn(self.norm1(x))
        return self.head((x + self.mlp(self.norm(x))).mean(1))


class ConvNeXtBlock(nn.Module):  # after torchvision's CNBlock: 7x7 depthwise, channels-last LayerNorm and MLP
    def __init__(self, c):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 0.5))  # layer scale

    def forward(self, x):
        return x + (self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))) * self.gamma).permute(0, 3, 1, 2)


class Pieces(nn.Module):  # Slice and Gather of activations at constant positions: a window, a stride, a list, one
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(16 + 32 + 32 + 16, 3)

    def forward(self, x):
        h = self.conv(x)
        parts = [h[:, :, 1:3, 1:3], h[..., ::2], h[:, [0, 3]], h[:, 1]]
        return self.fc(torch.cat([p.flatten(1) for p in parts], 1))


class ClassToken(nn.Module):  # transformers' ViT: a token broadcast to the batch, prepended, read back out
    def __init__(self):
        super().__init__()
        self.patch, self.cls = nn.Conv2d(3, 8, 2, 2), nn.Parameter(torch.zeros(1, 1, 8))
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
        return self.fc(self.norm(t + t.mean(1, keepdim=True))[:, 0])


def _flat(*layers):
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), *layers, nn.Linear(16, 3))


CASES = {
    "sigmoid tanh leaky-relu": lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Sigmoid(), nn.Linear(16, 16),
                                                     nn.Tanh(), nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3)),
    "gelu": lambda: _flat(nn.GELU()),
    "silu": lambda: _flat(nn.SiLU()),
    "hardswish hardsigmoid": lambda: _flat(nn.Hardswish(), nn.Linear(16, 16), nn.Hardsigmoid()),
    "relu6 batchnorm1d dropout": lambda: _flat(nn.BatchNorm1d(16), nn.ReLU6(), nn.Dropout(0.3)),
    "layernorm": lambda: _flat(nn.LayerNorm(16), nn.ReLU()),
    "groupnorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(64, 3)),
    "avgpool maxpool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(),
                                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4), Residual(4),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
    "concat": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Branches(), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(64, 3)),
    "squeeze-excite": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SqueezeExcite(4), nn.Flatten(),
                                            nn.Linear(64, 3)),
    "tokens: layernorm over features, matmul gradients": Tokens,
    "vit: attention heads, softmax inside, split": ViT,
    "convnext block": lambda: nn.Sequential(nn.Conv2d(3, 8, 2, 2), ConvNeXtBlock(8), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3)),
    "pad: tf-style same padding": lambda: nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2),
                                                        nn.ReLU(), nn.ConstantPad2d(1, 0.5), nn.Flatten(),
                                                        nn.Linear(64, 3)),
    "transpose view": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ViewFlatten(), nn.Linear(64, 3)),
    "slice and gather of activations": Pieces,
    "class token: expand to the batch": ClassToken,
    "padding same (auto_pad), even kernel": lambda: nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU(),
                                                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
    "depthwise batchnorm2d": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                                            nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                                                            nn.Flatten(), nn.Linear(96, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_an_imported_model_trains_as_pytorch_trains_it(case, tmp_path):
    """Exported without constant folding, so BatchNorm stays a layer of its own (folded into the
    Conv before it, the Conv's weights train instead: exact too, but not PyTorch's parameters)."""
    torch.manual_seed(0)
    m = CASES[case]()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    byo._stats(m)
    spec = models.get(str(byo.export(m, (3, 4, 4), tmp_path / "m.onnx", fold=False)))
    ours = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=0.1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.eval()  # statistics frozen, as exported: what the import trains
    rng = np.random.default_rng(1)
    for step in range(3):
        x, y = rng.standard_normal((6, 3, 4, 4)).astype(np.float32), rng.integers(0, 3, 6)
        loss = ours.step(x, y)
        opt.zero_grad()
        expected = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6), f"step {step}"
    x = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(ours.predict(x), m(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_relu6_and_hardtanh_at_their_bounds_pass_no_gradient_as_pytorch(tmp_path):
    """Units that are exactly 0 (a dead channel, normalised to 0) sit on ReLU6's lower bound: PyTorch's
    gradient there is 0, onnxruntime's Clip gradient passes dY; the import keeps PyTorch's."""
    for act in (nn.ReLU6(), nn.Hardtanh(0.0, 1.0)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), act, nn.Linear(16, 3))
        with torch.no_grad():
            m[1].weight[:4], m[1].bias[:4] = 0.0, 0.0  # four units exactly at the bound for every sample
        ours = SingleProcess(models.get(str(byo.export(m, (3, 4, 4), tmp_path / "clip.onnx"))),
                             optimizer=OptimizerConfig("sgd", lr=1.0))
        x, y = np.random.default_rng(0).standard_normal((6, 3, 4, 4)).astype(np.float32), np.arange(6) % 3
        ours.step(x, y)
        nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        stepped = m[1].weight.detach().numpy() - m[1].weight.grad.numpy()
        np.testing.assert_allclose(ours.params[next(k for k in ours.params if k.endswith("1.weight"))], stepped,
                                   rtol=1e-5, atol=1e-6)


def test_units_are_cut_between_blocks_named_after_modules_and_start_from_the_file(tmp_path):
    torch.manual_seed(0)
    net = byo.mobilenet()
    spec, found = onnxmodel.inspect(byo.export(net, (3, 32, 32), tmp_path / "mobile.onnx"))
    names = [u.name for u in spec.units]
    assert names == ["layer0", "layer3_0", "layer3_3", "layer4_block", "layer5_0", "layer5_3", "layer6_block",
                     "layer10"]
    assert spec.input_shape == (3, 32, 32) and spec.classes == 4 and found.cut_points >= spec.n_units - 1
    # an inverted residual is one unit: its input is used again by the Add, so nothing cuts inside it
    assert [u["ops"] for u in found.units][3] == ["Conv", "Clip", "Conv", "Clip", "Conv", "Add"]
    init = models.init_params(spec, seed=123)  # the file's weights, whatever the seed
    np.testing.assert_array_equal(init["layer10.10.weight"], net[10].weight.detach().numpy())
    assert spec.name == f"mobile-{found.name.split('-')[1]}" and models.get(str(tmp_path / "mobile.onnx")) is not None


def _refused(path, *parts):
    with pytest.raises(ConfigError) as e:
        models.get(str(path))
    text = str(e.value)
    assert "\n" not in text
    for p in parts:
        assert p in text, text
    return text


def test_what_cannot_be_trained_exactly_is_refused_naming_the_op_the_node_and_the_fix(tmp_path):
    conv_bn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5),
                            nn.Linear(64, 3))  # BatchNorm trains in training mode; Dropout's masks are random
    _refused(byo.export(conv_bn, (3, 4, 4), tmp_path / "bn.onnx", train=True),
             "Dropout", "/3/Dropout", "training mode", "model.eval()", "TrainingMode.PRESERVE")
    _refused(byo.export(_flat(nn.Softplus()), (3, 4, 4), tmp_path / "sp.onnx"), "Softplus", "/2/Softplus", "no gradient")
    _refused(byo.export(nn.Sequential(_flat(nn.ReLU()), nn.Softmax(1)), (3, 4, 4), tmp_path / "sm.onnx"),
             "Softmax", "export the logits")
    _refused(byo.export(_flat(nn.Softmax(0)), (3, 4, 4), tmp_path / "mid.onnx"), "Softmax", "runs along the batch")
    reflect = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    _refused(byo.export(reflect, (3, 4, 4), tmp_path / "reflect.onnx"), "Pad", "only constant padding", "'reflect'")


    class DropsASample(nn.Module):  # a Slice along the batch: samples would not stay apart
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)[1:])

    _refused(byo.export(DropsASample(), (3, 4, 4), tmp_path / "slice.onnx"), "Slice", "a sample's own dimensions")

    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    _refused(byo.export(Rnn(), (5, 4), tmp_path / "lstm.onnx"), "LSTM", "recurrent")

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 3)

        def forward(self, x):
            return self.fc(x.view(2, 48))

    _refused(byo.export(FixedBatch(), (3, 4, 4), tmp_path / "fixed.onnx", dynamic=False), "Reshape",
             "batch dimension", "torch.flatten(x, 1)")

    class DivideByActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 3)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x / (1 + x.abs()))

    _refused(byo.export(DivideByActivation(), (3, 4, 4), tmp_path / "div.onnx"), "Abs")  # unsupported, named

    x, y = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    two = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two", [x, y],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
                            opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(two, tmp_path / "two.onnx")
    _refused(tmp_path / "two.onnx", "one input", "takes 2")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    _refused(tmp_path / "junk.onnx", "not a valid ONNX model")


def test_model_import_prints_the_units_and_a_refusal_is_one_line(tmp_path):
    ok = byo.export(byo.mlp(), (8,), tmp_path / "mlp.onnx")
    out = subprocess.run([sys.executable, "-m", "hiertrain", "model", "import", str(ok)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5 units" in out.stdout and "gradients of every op built and lowered" in out.stdout
    bad = byo.export(_flat(nn.Softplus()), (3, 4, 4), tmp_path / "sp.onnx")
    out = subprocess.run([sys.executable, "-m", "hiertrain", "model", "import", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert "Softplus" in out.stderr
    out = subprocess.run([sys.executable, "-m", "hiertrain", "demo", "--model", "nothing.pt"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "neither one of" in out.stderr


# ------------------------------------------------------------------------------------------ data

def test_user_data_formats_load_shuffled_and_checked_against_the_model(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 8)).astype(np.float32), np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "d.npz", features=x, labels=y)
    ds = data.load("npz", path=str(tmp_path / "d.npz"))
    assert ds.shape == (8,) and len(ds) == 50 and ds.classes == 5
    assert not np.array_equal(ds.labels, y) and sorted(ds.labels) == sorted(y)  # a fixed shuffle
    np.testing.assert_array_equal(ds.labels, data.load("npz", path=str(tmp_path / "d.npz")).labels)

    byo.table(tmp_path / "t.csv", n=30)
    t = data.load("csv", path=str(tmp_path / "t.csv"))
    assert t.shape == (8,) and t.classes == 3 and t.images.dtype == np.float32  # the species column: the one of words
    byo.image_folder(tmp_path / "img", classes=3, per_class=4, size=20)
    im = data.load("images", path=str(tmp_path / "img"), shape=(1, 16, 16))  # converted to grey and resized
    assert im.images.shape == (12, 1, 16, 16) and im.images.dtype == np.uint8 and im.classes == 3

    (tmp_path / "mydata.py").write_text("import numpy as np\n"
                                        "def load(path=None):\n"
                                        "    return np.ones((6, 2), np.float32), np.array([0, 1, 0, 1, 0, 1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(data.load("python", entry="mydata:load", search=tmp_path)) == 6

    with pytest.raises(ConfigError, match=r"shaped \(8,\), but the model .* takes \(3, 32, 32\)"):
        data.check(ds, (3, 32, 32), 10, "lenet5")
    with pytest.raises(ConfigError, match="has label 4, but the model m has 3 classes"):
        data.check(ds, (8,), 3, "m")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n1,x,1\n")
    with pytest.raises(ConfigError, match="line 3: a feature that is not a number"):
        data.load("csv", path=str(bad))
    np.savez(tmp_path / "wrong.npz", a=x)
    with pytest.raises(ConfigError, match="name them x/y or images/labels"):
        data.load("npz", path=str(tmp_path / "wrong.npz"))
    with pytest.raises(ConfigError, match="must be module:function"):
        data.load("python", entry="mydata")
