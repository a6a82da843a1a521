"""Model tests: the FNN itself, device choice, and the committed default model on real MNIST."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime

import pytest
import torch

from service.device import DeviceError, resolve_device
from service.model import store
from service.model.fnn import FNN, MNIST_MEAN, MNIST_STD
from service.model.training import normalize

ACCURACY_FLOOR = 0.985


def xavier_uniform_bound(layer: torch.nn.Linear) -> float:
    """The +-bound of ``xavier_uniform_`` (gain 1) for a linear layer."""
    fan_out, fan_in = layer.weight.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


# ---------------------------------------------------------------- FNN: shapes and outputs

def test_flat_and_image_inputs_give_identical_logits():
    """(N, 784) and (N, 1, 28, 28) are the same images, so the logits must be the same."""
    torch.manual_seed(0)
    model = FNN().eval()
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        from_images = model(images)
        from_flat = model(images.reshape(5, 784))
    assert from_images.shape == (5, 10)
    assert torch.equal(from_images, from_flat)


def test_forward_is_linear_relu_linear():
    """The logits are exactly fc2(relu(fc1(x))): no hidden softmax, dropout or extra layer."""
    model = FNN().eval()
    x = torch.randn(3, 784)
    with torch.no_grad():
        expected = model.fc2(torch.relu(model.fc1(x)))
        assert torch.equal(model(x), expected)
    assert [name for name, _ in model.named_children()] == ["fc1", "relu", "fc2"]


# ---------------------------------------------------------------- FNN: initialisation

@pytest.mark.parametrize("layer_name", ["fc1", "fc2"])
def test_biases_are_initialised_to_0_01(layer_name):
    """Every bias starts at exactly 0.01."""
    bias = getattr(FNN(), layer_name).bias
    assert torch.equal(bias.detach(), torch.full_like(bias, 0.01))


@pytest.mark.parametrize("layer_name", ["fc1", "fc2"])
def test_weights_are_xavier_uniform(layer_name):
    """Weights fill U(-a, a) with a = sqrt(6 / (fan_in + fan_out)); PyTorch's default init is much narrower."""
    torch.manual_seed(0)
    layer = getattr(FNN(), layer_name)
    weight = layer.weight.detach()
    bound = xavier_uniform_bound(layer)
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.98 * bound  # fills the whole range, not a narrower one
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(weight.mean().item()) < 0.05 * bound


# ---------------------------------------------------------------- FNN: architecture record

def test_architecture_describes_the_784_500_10_net():
    """architecture() is what metadata.json records so a loader can rebuild the net."""
    assert FNN().architecture() == {
        "class": "FNN",
        "input_size": 784,
        "hidden_size": 500,
        "num_classes": 10,
        "layers": ["fc1: Linear", "relu: ReLU", "fc2: Linear"],
    }


def test_architecture_follows_constructor_arguments():
    """A non-default size is both built and recorded."""
    model = FNN(hidden_size=64)
    assert model.fc1.weight.shape == (64, 784)
    assert model.fc2.weight.shape == (10, 64)
    assert model.architecture()["hidden_size"] == 64


# ---------------------------------------------------------------- device choice

def test_cpu_is_always_available():
    """'cpu' resolves to the CPU on every machine."""
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_the_gpu_only_when_one_is_visible():
    """'auto' picks CUDA where a GPU is visible and the CPU otherwise."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_cuda_without_a_gpu_is_a_clear_error():
    """'cuda' never silently falls back to the CPU: it is the GPU, or a DeviceError that says why."""
    if torch.cuda.is_available():
        device = resolve_device("cuda")
        assert device.type == "cuda"
        assert torch.ones(1, device=device).item() == 1.0
    else:
        with pytest.raises(DeviceError, match=r"'cuda'.*no CUDA GPU is visible"):
            resolve_device("cuda")


# ---------------------------------------------------------------- the committed default model

@pytest.fixture(scope="module")
def measured(default_model, mnist_test):
    """Predictions of the committed model on the 10,000 real test images, normalised as in training."""
    images, labels = mnist_test
    with torch.inference_mode():
        preds = default_model.model(normalize(images)).argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    for true, pred in zip(labels.tolist(), preds.tolist()):
        confusion[true, pred] += 1
    return {"accuracy": (preds == labels).float().mean().item(), "confusion": confusion, "labels": labels}


def test_committed_model_scores_at_least_98_5_percent(measured, mnist_test):
    """The default model clears the accuracy floor on the full real MNIST test split."""
    assert len(mnist_test[0]) == 10_000
    print(f"committed model accuracy: {measured['accuracy']:.4%}")
    assert measured["accuracy"] >= ACCURACY_FLOOR


def test_committed_model_is_the_latest_version_and_in_eval_mode(default_model):
    """The store hands back the highest version, ready for inference."""
    assert default_model.name == store.DEFAULT_NAME
    assert default_model.version == store.list_versions(default_model.path.parent.parent, store.DEFAULT_NAME)[-1]
    assert not default_model.model.training


def test_committed_metadata_records_architecture_and_normalisation(default_model):
    """784-500-10 and the MNIST mean/std that training used."""
    meta = default_model.metadata.model_dump()
    arch = meta["architecture"]
    assert (arch["input_size"], arch["hidden_size"], arch["num_classes"]) == (784, 500, 10)
    assert meta["normalization"] == {"mean": MNIST_MEAN, "std": MNIST_STD}


def test_committed_metrics_match_what_we_measure(default_model, measured):
    """Recorded test accuracy, per-class accuracy and confusion matrix agree with a fresh evaluation."""
    metrics = default_model.metadata.model_dump()["metrics"]
    assert default_model.test_accuracy == pytest.approx(measured["accuracy"], abs=1e-4)
    assert metrics["test_images"] == 10_000

    confusion = torch.tensor(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum().item() == 10_000
    assert torch.equal(confusion.sum(1), torch.bincount(measured["labels"], minlength=10))
    assert confusion.diag().sum().item() / 10_000 == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert (confusion - measured["confusion"]).abs().sum().item() <= 2  # at most one image flipped

    per_class = metrics["per_class_accuracy"]
    assert sorted(per_class, key=int) == [str(c) for c in range(10)]
    for c in range(10):
        assert per_class[str(c)] == pytest.approx(confusion[c, c].item() / confusion[c].sum().item())


def test_committed_metadata_names_the_exact_data(default_model, data_dir):
    """The sha256 of each of the 4 raw MNIST files it was trained and tested on."""
    raw = data_dir / "MNIST" / "raw"
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw.iterdir() if p.name.endswith("ubyte")}
    assert len(expected) == 4
    assert default_model.metadata.model_dump()["data"]["sha256"] == expected


def test_committed_metadata_records_how_it_was_trained(default_model):
    """Hyperparameters, seed, torch version, creation time, duration and the command line."""
    meta = default_model.metadata.model_dump()
    training = meta["training"]
    for key in ("epochs", "batch_size", "lr", "hidden_size", "seed"):
        assert key in training, key
    assert training["hidden_size"] == 500
    assert isinstance(meta["seed"], int) and meta["seed"] == training["seed"]
    assert meta["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    created = datetime.fromisoformat(meta["created_at"])
    assert created.tzinfo is not None and created <= datetime.now(UTC)
    assert meta["training_seconds"] > 0
    assert meta["command"].startswith("python -m service.train")


def test_committed_metadata_sha256_is_the_files(default_model):
    """The recorded checksum is the sha256 of model.pt as committed."""
    weights = default_model.path / store.WEIGHTS_FILE
    assert default_model.metadata.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
