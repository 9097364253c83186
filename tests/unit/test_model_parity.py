"""Parity of our SAM against the real ``segment-anything==1.0`` package (vit_b, CPU, fp32).

Both directions: official weights loaded into ours with ``strict=True`` give the same
image embeddings, masks and IoU predictions; our weights exported to ``.pth`` load into
the official ``sam_model_registry`` and the official ``SamPredictor`` gives the same
results on the exported file as on our model.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.model import build_sam, export_official

pytestmark = pytest.mark.slow


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Max abs difference at most 1e-4 × max(1, max |reference|)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > tolerance {tol:.3g}"


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights everywhere, including the zero-initialised pos/rel-pos tables."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith(".weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5 + 0.01))


@pytest.fixture(scope="module")
def pair(official_sam: types.ModuleType) -> dict:
    from segment_anything.build_sam import sam_model_registry

    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]().eval()
    randomize(official, seed=1)
    ours = build_sam("vit_b").eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_emb = official.image_encoder(image)
        our_emb = ours.image_encoder(image)
    return {"official": official, "ours": ours, "ref_emb": ref_emb, "our_emb": our_emb}


def test_state_dict_keys_and_shapes_match(pair: dict) -> None:
    ref = pair["official"].state_dict()
    mine = pair["ours"].state_dict()
    assert list(ref) == list(mine)
    assert all(ref[k].shape == mine[k].shape for k in ref)
    assert len(ref) == 314


def test_image_embeddings_match(pair: dict) -> None:
    assert pair["ref_emb"].shape == (1, 256, 64, 64)
    assert_close(pair["our_emb"], pair["ref_emb"], "image embeddings")


def _prompt_cases() -> dict[str, dict]:
    gen = torch.Generator().manual_seed(3)
    pts = torch.rand(1, 3, 2, generator=gen) * 1024
    labels = torch.tensor([[1, 0, 1]])
    box = torch.tensor([[100.0, 200.0, 600.0, 700.0]])
    mask = torch.randn(1, 1, 256, 256, generator=gen) * 4
    batched_pts = torch.rand(5, 2, 2, generator=gen) * 1024
    batched_labels = torch.randint(0, 2, (5, 2), generator=gen)
    batched_boxes = torch.sort(torch.rand(5, 2, 2, generator=gen) * 1024, dim=1).values.reshape(5, 4)
    return {
        "points": dict(points=(pts, labels), boxes=None, masks=None),
        "single_point": dict(points=(pts[:, :1], labels[:, :1]), boxes=None, masks=None),
        "box": dict(points=None, boxes=box, masks=None),
        "points_and_box": dict(points=(pts[:, :2], labels[:, :2]), boxes=box, masks=None),
        "mask_input": dict(points=(pts[:, :1], labels[:, :1]), boxes=None, masks=mask),
        "batched_points": dict(points=(batched_pts, batched_labels), boxes=None, masks=None),
        "batched_boxes": dict(points=None, boxes=batched_boxes, masks=None),
    }


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", list(_prompt_cases()))
def test_decoder_outputs_match(pair: dict, case: str, multimask: bool) -> None:
    prompts = _prompt_cases()[case]
    outputs = []
    for name, emb in (("official", pair["ref_emb"]), ("ours", pair["our_emb"])):
        model = pair[name]
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(**prompts)
            masks, iou = model.mask_decoder(
                image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            )
        outputs.append((sparse, dense, masks, iou))
    (rs, rd, rm, ri), (os_, od, om, oi) = outputs
    assert_close(os_, rs, f"{case} sparse embeddings")
    assert_close(od, rd, f"{case} dense embeddings")
    assert om.shape[1] == (3 if multimask else 1)
    assert_close(om, rm, f"{case} masks")
    assert_close(oi, ri, f"{case} iou predictions")


def _install_torchvision_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test-only stand-in for the two torchvision functions ``SamPredictor`` uses.

    PyPI torchvision cannot import beside the CPU torch build on our machines, and
    ``segment_anything.utils.transforms`` only needs ``resize`` (PIL bilinear, as
    torchvision does for PIL images) and ``to_pil_image``; Pillow does both.
    """

    def to_pil_image(array: np.ndarray) -> Image.Image:
        return Image.fromarray(np.asarray(array))

    def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
        return img.resize((size[1], size[0]), Image.BILINEAR)

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = resize, to_pil_image
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    tv = types.ModuleType("torchvision")
    tv.transforms = transforms
    for name, mod in (("torchvision", tv), ("torchvision.transforms", transforms),
                      ("torchvision.transforms.functional", functional)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_export_loads_in_official_and_predictor_agrees(pair: dict, tmp_path, monkeypatch) -> None:
    from segment_anything.build_sam import sam_model_registry

    _install_torchvision_standin(monkeypatch)
    from segment_anything.predictor import SamPredictor

    path = tmp_path / "sam_vit_b_export.pth"
    export_official(pair["ours"], str(path))
    official = sam_model_registry["vit_b"](checkpoint=str(path)).eval()
    for key, value in pair["ours"].state_dict().items():
        assert torch.equal(official.state_dict()[key], value), key

    image = (np.random.default_rng(4).random((480, 640, 3)) * 255).astype(np.uint8)
    results = []
    for model in (official, pair["ours"]):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        masks, iou, low_res = predictor.predict(
            point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1]),
            box=np.array([100, 80, 500, 400]), multimask_output=False,
        )
        results.append((torch.from_numpy(low_res), torch.from_numpy(iou), masks))
    assert_close(results[1][0], results[0][0], "predictor low-res logits")
    assert_close(results[1][1], results[0][1], "predictor iou")
    agree = (results[0][2] == results[1][2]).mean()
    assert agree > 0.999, f"binary masks agree on only {agree:.4%} of pixels"
