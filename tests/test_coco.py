"""MS COCO as image-caption pairs (datalens.core.coco) against a direct reading of tiny COCO-format
files, and the CLIP stage of the paper profile (profiles/cifar10.yaml) end to end on them: a
ResNet-9 image tower, randomly initialised at a tiny width; only sizes are overridden."""
import json

import numpy as np
import pytest
from PIL import Image

from datalens.core.coco import coco_captions, load_coco, missing_coco
from datalens.core.config import ParamError, check_params_file
from conftest import paper_profile, run_profile_stage

WORDS = ("a", "red", "blue", "green", "square", "ball", "on", "the", "table", "dog")


def _tiny_coco(root, n_train=40, n_val=16, seed=0) -> dict:
    """COCO 2017 layout with two captions per image, the first (lowest annotation id) naming its
    colour; returns {split: [first captions in image-id order]}."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    firsts, ann_id = {}, 1000
    for split, folder, n in (("train", "train2017", n_train), ("val", "val2017", n_val)):
        (root / folder).mkdir()
        images, annotations, first = [], [], []
        for k, image_id in enumerate(rng.permutation(np.arange(10, 10 + n))):  # image ids out of order in the file
            colour = ("red", "green", "blue")[k % 3]
            pixels = np.zeros((20, 24, 3), np.uint8)
            pixels[..., ("red", "green", "blue").index(colour)] = 200
            Image.fromarray(pixels).save(root / folder / f"{image_id:012d}.jpg")
            images.append({"id": int(image_id), "file_name": f"{image_id:012d}.jpg"})
            caption = f"A {colour} {WORDS[4 + k % 6]} on the table."
            annotations += [{"id": ann_id + 1, "image_id": int(image_id), "caption": "the dog"},  # a later id: not kept
                            {"id": ann_id, "image_id": int(image_id), "caption": caption}]
            first.append((int(image_id), caption))
            ann_id += 2
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
        firsts[split] = [c for _, c in sorted(first)]
    return firsts


def test_coco_pairs_keep_each_images_first_caption_tokenised_by_training_frequency(tmp_path):
    firsts = _tiny_coco(tmp_path / "coco")
    ds = load_coco(tmp_path / "coco", size=8, vocab_size=6, length=5)
    assert ds.x_train.shape == (40, 3, 8, 8) and ds.y_train.shape == (40, 5 + 15) and ds.y_test.shape == (16, 20)
    np.testing.assert_allclose(ds.x_train.mean((0, 2, 3)), 0, atol=1e-4)  # standardised per channel on the training images
    counts = {}
    for c in firsts["train"]:
        for w in c.lower().replace(".", "").split():
            counts[w] = counts.get(w, 0) + 1
    kept = sorted(counts, key=lambda w: (-counts[w], w))[:4]  # vocab_size 6: pad, unknown, then 4 words
    assert ds.class_names == ("<pad>", "<unk>", *kept)
    for tokens, caption in zip(ds.y_train[:, :5], firsts["train"]):
        words = caption.lower().replace(".", "").split()[:5]
        assert list(tokens[:len(words)]) == [kept.index(w) + 2 if w in kept else 1 for w in words]
    assert not (ds.y_test[:, 5:] == np.arange(16)[:, None]).any()  # a validation pair is never its own negative
    # the red images are red: pixels as read, in image-id order
    red = [i for i, c in enumerate(firsts["val"]) if " red " in c]
    assert (ds.images_test[red][..., 0] > 0.7).all() and (ds.images_test[red][..., 2] < 0.1).all()


def test_missing_coco_is_named_before_any_work(root, tmp_path):
    assert "captions_train2017.json" in missing_coco(tmp_path) and missing_coco(tmp_path).startswith("MS COCO captions not found")
    with pytest.raises(FileNotFoundError, match="MS COCO captions not found"):
        coco_captions(tmp_path)
    paper_profile(root, tmp_path)
    with pytest.raises(ParamError, match=r"clip.data.root='data/coco': MS COCO captions not found"):
        check_params_file(tmp_path / "params.yaml", environment=True)


@pytest.mark.slow
def test_the_clip_paper_profile_runs_end_to_end_on_tiny_coco_data(root, tmp_path):
    paper_profile(root, tmp_path)
    _tiny_coco(tmp_path / "data" / "coco", n_train=48, n_val=20)
    result = run_profile_stage(root, tmp_path, "09_clip", "clip", {
        "model.width": 4, "model.dim": 8, "model.text_hidden": 8, "train.num_models": 20, "train.num_checkpoints": 3, "train.epochs": 2,
        "train.peak_epoch": 1, "train.batch_size": 16, "evaluation.num_masks": 6, "trak.num_models": [1, 3], "trak.proj_dims": [16],
        "attribution.ensemble_sizes": [1, 2], "attribution.tracin_epochs": [1, 2], "attribution.selection_models": 6,
        "attribution.num_targets": 10, "counterfactuals.num_targets": 2, "counterfactuals.ks": [4], "counterfactuals.num_retrains": 1})
    out = tmp_path / "clip"
    methods = {r["method"] for r in result["records"]}
    assert methods == {"trak", "empirical_influence", "grad_dot", "grad_cosine", "embedding_similarity", "tracin"}  # no datamodels
    assert set(result["counterfactual"]) == {"trak", "embedding_similarity", "random"}
    assert len(list((tmp_path / "stores" / "clip" / "train_subsets").glob("*.zarr"))) == 1  # stores land beside the params file
    assert (out / "figures" / "top_attributed_pairs.png").exists()
