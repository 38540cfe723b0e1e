"""QNLI for a sentence-pair classifier (datalens.core.qnli) against a direct reading of tiny
GLUE-format files, the BERT of transformers built from its config (datalens.core.hf_models)
against a loop of autograd and against its own padding, and the text-classification stage of the
paper profile (profiles/cifar10.yaml) end to end on those files with a tiny random BERT; only
sizes are overridden."""

import numpy as np
import pytest
import torch

from datalens.core.config import ParamError, check_params_file
from datalens.core.hf_models import sequence_classifier
from datalens.core.qnli import load_qnli, missing_qnli, qnli
from datalens.tasks.classification import ClassificationTask
from conftest import assert_gradients_match_autograd, paper_profile, run_profile_stage

CITIES = ("paris", "rome", "oslo", "lima", "kyiv", "baku")
COUNTRIES = ("france", "italy", "norway", "peru", "ukraine", "azerbaijan")


def write_tiny_qnli(root, repeats=4, seed=0) -> dict:
    """GLUE's two QNLI files: "what is the capital of country ?" beside "city is the capital of
    country ." (entailment) or "city has a river ." (not). Returns each split's rows as written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    written = {}
    for name, reps in (("train", repeats), ("dev", 1)):
        rows = []
        for r in range(reps):
            for k, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
                answered = (r + k + (name == "dev")) % 2 == 0
                sentence = f"{city} is the capital of {country} ." if answered else f"{city} has a river ."
                rows.append((f"what is the capital of {country} ?", sentence, "entailment" if answered else "not_entailment"))
        rows = [rows[i] for i in rng.permutation(len(rows))]
        lines = ["index\tquestion\tsentence\tlabel"] + [f"{i}\t{q}\t{s}\t{y}" for i, (q, s, y) in enumerate(rows)]
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        written[name] = rows
    return written


def test_qnli_reads_labels_and_tokenises_question_separator_sentence(tmp_path):
    rows = write_tiny_qnli(tmp_path / "qnli")
    ds = load_qnli(tmp_path / "qnli", vocab_size=12, length=10)
    assert ds.y_train.tolist() == [int(y == "entailment") for _, _, y in rows["train"]]
    assert ds.y_test.tolist() == [int(y == "entailment") for _, _, y in rows["dev"]]
    vocab_counts: dict[str, int] = {}
    for q, s, _ in rows["train"]:
        for w in (q + " " + s).replace("?", " ").replace(".", " ").split():
            vocab_counts[w] = vocab_counts.get(w, 0) + 1
    kept = sorted(vocab_counts, key=lambda w: (-vocab_counts[w], w))[:12 - 3]  # ids 2..10; 11 separates
    ids = {w: i + 2 for i, w in enumerate(kept)}
    for (q, s, _), x in zip(rows["train"], ds.x_train):
        qw, sw = q[:-2].split(), s[:-2].split()
        want = ([ids.get(w, 1) for w in qw][:5] + [11] + [ids.get(w, 1) for w in sw])[:10]
        assert x.tolist() == want + [0] * (10 - len(want))


def test_missing_qnli_is_named_before_any_work(root, tmp_path):
    assert missing_qnli(tmp_path).startswith("QNLI not found") and "dev.tsv" in missing_qnli(tmp_path)
    with pytest.raises(FileNotFoundError, match="QNLI not found"):
        qnli(tmp_path)
    paper_profile(root, tmp_path)
    # COCO and FTRACE are missing too: each is its own line of the one error
    with pytest.raises(ParamError, match=r"text_classification.data.root='data/qnli': QNLI not found"):
        check_params_file(tmp_path / "params.yaml", environment=True)


def test_qnli_rejects_an_unknown_label_naming_its_line(tmp_path):
    write_tiny_qnli(tmp_path / "qnli")
    path = tmp_path / "qnli" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dev.tsv: line 3 has label 'maybe'"):
        load_qnli(tmp_path / "qnli", vocab_size=12, length=10)


def test_bert_per_example_gradients_equal_a_loop_of_autograd_and_padding_changes_nothing(tmp_path):
    write_tiny_qnli(tmp_path / "qnli")
    ds = load_qnli(tmp_path / "qnli", vocab_size=12, length=10)
    torch.manual_seed(0)
    model, task = sequence_classifier(ds.input_shape, 2, vocab_size=12, dim=8, layers=2, heads=2).double(), ClassificationTask()
    x, y = torch.as_tensor(ds.x_train[:5]), torch.as_tensor(ds.y_train[:5])
    assert_gradients_match_autograd(model, x, y, task)
    longer = sequence_classifier((14,), 2, vocab_size=12, dim=8, layers=2, heads=2).double()
    own = model.state_dict()
    longer.load_state_dict({k: torch.cat([own[k], v[10:]]) if "position_embeddings" in k else own[k] for k, v in longer.state_dict().items()})
    padded = torch.cat([x, torch.zeros(len(x), 4, dtype=x.dtype)], 1)  # more padding at the end: the same logits
    torch.testing.assert_close(longer(padded), model(x))


@pytest.mark.slow
def test_the_text_classification_paper_profile_runs_end_to_end_on_tiny_qnli_data(root, tmp_path):
    paper_profile(root, tmp_path)
    write_tiny_qnli(tmp_path / "data" / "qnli", repeats=6)
    result = run_profile_stage(root, tmp_path, "11_text_classification", "text_classification", {
        "model.dim": 8, "model.layers": 1, "model.heads": 2, "train.num_models": 16, "train.num_checkpoints": 3, "train.block_size": 8,
        "train.epochs": 2, "train.batch_size": 8, "train.precision": "float32", "evaluation.num_masks": 5, "trak.num_models": [1, 3],
        "trak.proj_dims": [16], "attribution.ensemble_sizes": [1, 2], "attribution.tracin_epochs": [1, 2],
        "attribution.selection_models": 5, "attribution.num_targets": 4, "attribution.ekfac_dampings": [0.1, 1.0]})
    out = tmp_path / "text_classification"
    assert {r["method"] for r in result["records"]} == {"trak", "empirical_influence", "grad_dot", "grad_cosine", "ekfac_influence",
                                                       "embedding_similarity", "tracin"}  # no datamodels at this profile
    assert "same_subject_top5" not in result  # QNLI names no facts
    assert (out / "figures" / "top_pairs.png").exists()
    assert len(list((tmp_path / "stores" / "text_classification" / "train_subsets").glob("*.zarr"))) == 1
