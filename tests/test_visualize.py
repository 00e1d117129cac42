"""The kept-token drawing agrees, pixel for pixel, with the recorded provenance."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import evit_patch
from evit_patch import DROPPED, FUSED, KEPT
from evit_patch.tools.visualize import DROPPED_GREY, FUSED_TINT, PANEL_GAP, main, render, status_maps


def test_png_masks_agree_with_kept_indices(tmp_path) -> None:
    torch.manual_seed(0)
    model = evit_patch.apply_evit(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4).eval(), [1, 2], 0.5,
                                  fuse=False)
    evit_patch.set_keep_rate(model, 0.5)
    images = torch.randn(1, 3, 64, 64)
    maps = [m[0] for m in status_maps(model, images)]
    layers = evit_patch.kept_tokens(model)
    first_kept = set(layers[0].kept_index[0].tolist())
    assert {p for p in range(16) if maps[0].flatten()[p] == KEPT} == first_kept
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(render(picture, maps, scale=2)).save(tmp_path / "grid.png")
    drawn = np.asarray(Image.open(tmp_path / "grid.png"))
    assert drawn.shape == (128, 3 * 128 + 2 * PANEL_GAP, 3)
    big = np.kron(picture, np.ones((2, 2, 1), dtype=np.uint8))
    for index, status in enumerate(maps, start=1):
        left = index * (128 + PANEL_GAP)
        for patch, value in enumerate(status.flatten().tolist()):
            r, c = divmod(patch, 4)
            region = drawn[r * 32:(r + 1) * 32, left + c * 32:left + (c + 1) * 32]
            source = big[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
            if value == KEPT:
                assert np.array_equal(region, source)
            elif value == DROPPED:
                assert (region == DROPPED_GREY).all()
            else:
                assert value == FUSED
                np.testing.assert_array_equal(region, (0.4 * source + 0.6 * FUSED_TINT).round().astype(np.uint8))


def test_command_line_draws_an_image_file(tmp_path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    weights = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4).state_dict()
    save_file(weights, str(tmp_path / "weights.safetensors"))
    out = main(["--model", "deit_tiny_patch16_224", "--model-arg", "img_size=64", "--model-arg", "depth=4",
                "--checkpoint", str(tmp_path / "weights.safetensors"),
                "--layers", "1", "2", "--keep-rate", "0.5", "--image", str(tmp_path / "in.png"),
                "--out", str(tmp_path / "out.png")])
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (64, 3 * 64 + 2 * PANEL_GAP, 3)
    second = drawn[:, 64 + PANEL_GAP:128 + PANEL_GAP]
    blue_patches = sum(
        np.all(second[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16, 2] >= 150) for r in range(4) for c in range(4)
    )
    assert blue_patches == 16 - 8  # 16 patches at keep 0.5: 8 fused into the blue token


def test_command_line_draws_fashion_mnist_samples_from_a_run(tmp_path) -> None:
    from finetune_helpers import tiny_recipe

    import evit_patch.train.loop as loop

    run = loop.train(tiny_recipe(tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 1}}), show_progress=False)
    out = main(["--run", str(run), "--fashion-mnist", "0", "1", "--scale", "2", "--out", str(tmp_path / "fm.png")])
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (2 * 56 + PANEL_GAP, 2 * 56 + PANEL_GAP, 3)  # 2 rows; input + 1 layer each


@pytest.mark.parametrize("arguments, says", [
    (["--model", "deit_tiny_patch16_224"], "random weights without --checkpoint FILE or --pretrained"),
    ([], "give --run DIR"),
])
def test_command_line_refuses_to_draw_a_random_model(tmp_path, capsys, arguments, says) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*arguments, "--fashion-mnist", "0", "--out", str(tmp_path / "x.png")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in error and "Traceback" not in error
    assert not (tmp_path / "x.png").exists()
