"""UNet2D pieces without a server: the Ronneberger network, 2D metrics with hand-computed answers,
border weights, slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import serving_meta
from lib.conf import ConfError, parse_label_map
from lib.metrics import isbi_scores, scores_2d, soft_dice
from lib.networks import UNet2D, UNet2DSpec, count_parameters
from lib.transforms import BorderWeightd, RandSliced, border_weight_map


def two_cells(gap: int = 2) -> np.ndarray:
    """10x22 map: two 10x10 cells (value 1) side by side, ``gap`` membrane columns between them."""
    lab = np.zeros((10, 20 + gap), dtype=np.int64)
    lab[:, :10] = 1
    lab[:, 10 + gap :] = 1
    return lab


def test_full_unet2d_is_the_paper_network() -> None:
    spec = UNet2DSpec.from_preset("full", in_channels=1, out_channels=2)
    assert spec.filters == [64, 128, 256, 512, 1024]
    net = UNet2D(spec)
    assert 31.0e6 < count_parameters(net) < 31.1e6  # the paper's ~31M
    assert net(torch.zeros(1, 1, 64, 96)).shape == (1, 2, 64, 96)


def test_valid_padding_overlap_tile_sizes() -> None:
    net = UNet2D(UNet2DSpec(base_filters=2, depth=4, padding="valid"))
    assert net.valid_output_size(572) == 388  # the paper's tile: 572 in, 388 out
    assert net.tile_input_size(388) == 572
    # any input size comes back whole: borders are mirror-padded, interior context is real
    for h, w in ((37, 50), (16, 16), (3, 5)):
        assert net(torch.randn(1, 1, h, w)).shape == (1, 2, h, w)
    with pytest.raises(ValueError, match="padding"):
        UNet2DSpec(padding="reflect")


def test_valid_padding_is_translation_consistent_inside() -> None:
    """Away from the borders the unpadded network sees only real pixels: shifting the crop shifts the output."""
    torch.manual_seed(0)
    net = UNet2D(UNet2DSpec(base_filters=2, depth=1, padding="valid")).eval()
    img = torch.randn(1, 1, 64, 64)
    a = net(img[..., :48, :48])
    b = net(img[..., 8:56, 8:56])
    assert torch.allclose(a[..., 16:32, 16:32], b[..., 8:24, 8:24], atol=1e-5)


def test_soft_dice_known_values() -> None:
    ref = np.array([[0, 1], [0, 1]])
    perfect = np.stack([ref == 0, ref == 1]).astype(np.float32)
    assert soft_dice(perfect, ref) == pytest.approx(1.0)
    uniform = np.full((2, 2, 2), 0.5, dtype=np.float32)
    assert soft_dice(uniform, ref) == pytest.approx(0.5, abs=1e-5)  # 2*(0.5*2) / (2 + 2) per class


def test_isbi_identical_scores_one() -> None:
    lab = two_cells()
    s = isbi_scores(lab, lab)
    assert s["v_rand"] == pytest.approx(1.0) and s["v_info"] == pytest.approx(1.0)


def test_isbi_merge_error() -> None:
    """Membrane predicted as cell joins two equal reference cells: V_rand = 0.5 / 0.75, V_info = 0."""
    ref = two_cells()
    pred = np.ones_like(ref)
    s = isbi_scores(pred, ref)
    assert s["v_rand"] == pytest.approx(2 / 3)
    assert s["v_rand_split"] == pytest.approx(1.0) and s["v_rand_merge"] == pytest.approx(0.5)
    assert s["v_info"] == pytest.approx(0.0) and s["v_info_split"] == pytest.approx(1.0)


def test_isbi_split_error_after_thinning() -> None:
    """A false membrane column cuts one reference cell into halves (the column is absorbed by thinning)."""
    ref = np.zeros((10, 20), dtype=np.int64)
    ref[:, :] = 1
    pred = ref.copy()
    pred[:, 10] = 0
    s = isbi_scores(pred, ref)
    assert s["v_rand"] == pytest.approx(2 / 3)
    assert s["v_rand_split"] == pytest.approx(0.5) and s["v_rand_merge"] == pytest.approx(1.0)
    assert s["v_info"] == pytest.approx(0.0)
    unthinned = isbi_scores(pred, ref, thin=False)  # the membrane column is then one more segment
    assert unthinned["v_rand"] < s["v_rand"]


def test_isbi_rejects_empty_reference() -> None:
    with pytest.raises(ValueError, match="no foreground"):
        isbi_scores(np.ones((4, 4)), np.zeros((4, 4)))


def test_scores_2d_combines_everything() -> None:
    ref = two_cells()
    probs = np.stack([ref == 0, ref == 1]).astype(np.float32)
    s = scores_2d(probs, ref)
    assert (
        s["dice"] == pytest.approx(1.0) and s["soft_dice"] == pytest.approx(1.0) and s["v_rand"] == pytest.approx(1.0)
    )


def test_border_weights_match_the_formula() -> None:
    lab = two_cells(gap=2)
    w = border_weight_map(lab, w0=10, sigma=5)
    n, n0 = lab.size, int((lab == 0).sum())
    class0 = n / (2 * n0)
    # gap pixel in column 10: 1 px from the left cell, 2 px from the right one
    assert w[5, 10] == pytest.approx(class0 + 10 * math.exp(-((1 + 2) ** 2) / 50), rel=1e-5)
    assert w[5, 3] == pytest.approx(n / (2 * (n - n0)))  # inside a cell: class weight only
    single = np.zeros((8, 8), dtype=np.int64)
    single[2:5, 2:5] = 1
    assert np.allclose(border_weight_map(single), np.where(single == 1, 64 / (2 * 9), 64 / (2 * 55)))


def test_border_weights_per_slice_of_a_volume() -> None:
    vol = np.stack([two_cells(), np.ones((10, 22), dtype=np.int64)], axis=-1)[None]  # (1, 10, 22, 2)
    out = BorderWeightd("label", axis=2)({"label": vol})["weight"]
    assert tuple(out.shape) == vol.shape
    assert np.allclose(np.asarray(out[0, ..., 0]), border_weight_map(vol[0, ..., 0]))


def test_rand_slice_prefers_foreground() -> None:
    img = torch.arange(2 * 3 * 4 * 50, dtype=torch.float32).reshape(1, 6, 4, 50)
    lab = torch.zeros(1, 6, 4, 50)
    lab[0, :, :, 7] = 1
    t = RandSliced(keys=["image", "label"], axis=2, pos_fraction=1.0)
    t.set_random_state(0)
    out = t({"image": img, "label": lab})
    assert tuple(out["image"].shape) == (1, 6, 4) and torch.equal(torch.as_tensor(out["image"]), img[..., 7])
    flat = {"image": img[..., 0], "label": lab[..., 0]}
    assert t(flat)["image"].shape == (1, 6, 4)  # 2D passes through


def test_label_map_parsing() -> None:
    assert parse_label_map("255:1") == {255: 1}
    assert parse_label_map("255=1, 128=2") == {255: 1, 128: 2}
    assert parse_label_map("none") == {}
    with pytest.raises(ConfError, match="pairs"):
        parse_label_map("255")


def test_weighted_loss_and_sgd_train_in_process(tmp_path) -> None:
    """The paper's options (border-weighted CE, SGD momentum 0.99) train and are recorded in the published meta."""
    from PIL import Image

    from conftest import APP_DIR, DATA
    from main import UNetSegApp

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in (0, 1, 2):
        img = np.asarray(Image.open(DATA / "isbi2012" / "train" / "image" / f"{i}.png"))[:96, :96]
        lab = np.asarray(Image.open(DATA / "isbi2012" / "train" / "label" / f"{i}.png"))[:96, :96]
        Image.fromarray(img).save(studies / f"em{i}.png")
        Image.fromarray(lab).save(studies / "labels" / "final" / f"em{i}.png")
    app = UNetSegApp(
        str(APP_DIR),
        str(studies),
        {
            "models": "unet2d",
            "preset": "tiny",
            "roi_size": "32",
            "tracking": "none",
            "model_dir": str(tmp_path / "model"),
        },
    )
    stats = app.train(
        {"model": "unet2d", "max_epochs": 1, "loss": "weighted_ce_dice", "optimizer": "sgd", "val_split": 0.34}
    )
    meta = serving_meta(tmp_path / "model", "unet2d")
    assert meta["loss"] == "weighted_ce_dice" and meta["label_map"] == {"255": 1}
    assert stats["val_cases"] == 1 and "cell" in stats["val_dice_per_class"]
    with pytest.raises(ValueError, match="loss: expected one of"):
        app.train({"model": "unet2d", "max_epochs": 1, "loss": "focal"})
