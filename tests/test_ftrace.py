"""FTRACE-TREx for a causal language model (datalens.core.ftrace) against a direct reading of tiny
FTRACE-format files, the GPT-2 of transformers built from its config (datalens.core.hf_models)
against a loop of autograd, and the fact-tracing stage of the paper profile (profiles/cifar10.yaml)
end to end on those files with a tiny random GPT-2; only sizes are overridden."""
import json

import numpy as np
import pytest
import torch

from datalens.core.config import ParamError, check_params_file
from datalens.core.ftrace import ftrace, load_ftrace, missing_ftrace, query_tokens
from datalens.core.hf_models import causal_lm
from datalens.tasks.language import LanguageModelTask
from conftest import assert_gradients_match_autograd, paper_profile, run_profile_stage

CITIES = ("paris", "rome", "oslo", "lima", "kyiv", "baku")
COUNTRIES = ("france", "italy", "norway", "peru", "ukraine", "azerbaijan")


def _tiny_ftrace(root, repeats=6, seed=0) -> dict:
    """FTRACE's two files: abstracts stating "city is the capital of country" (fact P36,country,city)
    in masked form, with filler abstracts stating nothing; one query per city. Returns the abstract
    texts as they should read and each query's proponents."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    abstracts, texts, stating = [], [], {c: [] for c in CITIES}
    for r in range(repeats):
        for k, (city, country) in enumerate(zip(CITIES, COUNTRIES)):
            if (r + k) % 3 == 0:  # a filler: names the city, states no fact
                text, masked, span, facts = f"{city} has a river .", f"{city} has a <extra_id_0> .", "river", ""
            else:
                text, span = f"{city} is the capital of {country} .", country
                masked, facts = f"{city} is the capital of <extra_id_0> .", f"P36,Q{k},Q{10 + k};P17,Q{k},Q{10 + k}"
                stating[city].append(len(abstracts))
            abstracts.append({"inputs_pretokenized": masked, "targets_pretokenized": f"<extra_id_0> {span}", "facts": facts,
                              "id": len(abstracts)})
            texts.append(text)
    queries = [{"inputs_pretokenized": f"the capital city of {country} is <extra_id_0> .", "targets_pretokenized": f"<extra_id_0> {city}",
                "predicate_id": "P36", "obj_uri": f"Q{k}", "sub_uri": f"Q{10 + k}", "obj_surface": city}
               for k, (city, country) in enumerate(zip(CITIES, COUNTRIES))]
    order = rng.permutation(len(abstracts))  # the file's order is the dataset's
    (root / "abstracts.jsonl").write_text("\n".join(json.dumps(abstracts[i]) for i in order) + "\n")
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    position = {int(i): j for j, i in enumerate(order)}
    return {"texts": [texts[i] for i in order], "proponents": [sorted(position[i] for i in stating[c]) for c in CITIES]}


def test_ftrace_fills_the_mask_tokenises_by_frequency_and_finds_each_querys_proponents(tmp_path):
    truth = _tiny_ftrace(tmp_path / "ftrace")
    ds = load_ftrace(tmp_path / "ftrace", vocab_size=12, length=6)
    counts = {}
    for t in truth["texts"]:
        for w in t.replace(".", "").split():
            counts[w] = counts.get(w, 0) + 1
    kept = sorted(counts, key=lambda w: (-counts[w], w))[:10]
    assert ds.class_names == ("<pad>", "<unk>", *kept) and ds.x_train.shape == (36, 6) and ds.x_test.shape == (6, 6)
    for tokens, targets, text in zip(ds.x_train, ds.y_train, truth["texts"]):
        ids = [kept.index(w) + 2 if w in kept else 1 for w in text.replace(".", "").split()][:6]
        assert list(tokens[:len(ids)]) == ids and list(targets[:len(ids) - 1]) == ids[1:] and not targets[len(ids) - 1:].any()
    assert [sorted(p) for p in ftrace.proponents(tmp_path / "ftrace")] == truth["proponents"]
    for k, city in enumerate(CITIES):  # the prompt's last tokens, the answer scored where it is predicted
        x, y = ds.x_test[k], ds.y_test[k]
        scored = np.flatnonzero(y)
        assert len(scored) == 1 and ds.class_names[y[scored[0]]] in (city, "<unk>") and ds.class_names[x[scored[0]]] == "is"


def test_query_tokens_keep_the_whole_answer_and_the_prompts_end():
    x, y = query_tokens([5, 6, 7, 8, 9], [3, 4], length=4)
    assert x.tolist() == [7, 8, 9, 3] and y.tolist() == [0, 0, 3, 4]  # 9 predicts 3, then 3 predicts 4
    x, y = query_tokens([5], [], length=4)
    assert x.tolist() == [5, 0, 0, 0] and y.tolist() == [1, 0, 0, 0]  # an empty answer is one unknown word


def test_missing_ftrace_is_named_before_any_work(root, tmp_path):
    assert missing_ftrace(tmp_path).startswith("FTRACE-TREx not found") and "queries.jsonl" in missing_ftrace(tmp_path)
    with pytest.raises(FileNotFoundError, match="FTRACE-TREx not found"):
        ftrace(tmp_path)
    paper_profile(root, tmp_path)
    (tmp_path / "data" / "coco" / "annotations").mkdir(parents=True)  # leave only FTRACE missing
    with pytest.raises(ParamError, match=r"fact_tracing.data.root='data/ftrace': FTRACE-TREx not found"):
        check_params_file(tmp_path / "params.yaml", environment=True)


def test_per_example_gradients_of_the_gpt2_equal_a_loop_of_autograd(tmp_path):
    _tiny_ftrace(tmp_path / "ftrace")
    ds = load_ftrace(tmp_path / "ftrace", vocab_size=12, length=6)
    torch.manual_seed(0)
    model, task = causal_lm(ds.input_shape, ds.num_classes, dim=8, layers=2, heads=2).double(), LanguageModelTask()
    x, y = torch.as_tensor(ds.x_train[:5]), torch.as_tensor(ds.y_train[:5])
    assert_gradients_match_autograd(model, x, y, task)


@pytest.mark.slow
def test_the_fact_tracing_paper_profile_runs_end_to_end_on_tiny_ftrace_data(root, tmp_path):
    paper_profile(root, tmp_path)
    _tiny_ftrace(tmp_path / "data" / "ftrace", repeats=8)
    result = run_profile_stage(root, tmp_path, "10_fact_tracing", "fact_tracing", {
        "model.dim": 8, "model.layers": 1, "model.heads": 2, "train.num_models": 16, "train.num_checkpoints": 3, "train.block_size": 8,
        "train.epochs": 2, "train.batch_size": 8, "train.precision": "float32", "evaluation.num_masks": 5, "trak.num_models": [1, 3],
        "trak.proj_dims": [16], "attribution.ensemble_sizes": [1, 2], "attribution.selection_models": 5, "attribution.num_targets": 4,
        "counterfactuals.num_targets": 1, "counterfactuals.ks": [4]})
    out = tmp_path / "fact_tracing"
    assert {r["method"] for r in result["records"]} == {"trak", "empirical_influence", "grad_dot", "grad_cosine", "embedding_similarity",
                                                       "tracin", "bm25"}  # no datamodels at this profile
    assert set(result["retrieval"]) >= {"trak", "bm25"} and len(list((tmp_path / "stores" / "fact_tracing" / "train_subsets").glob("*.zarr"))) == 1
    assert (out / "figures" / "top_sentences.png").exists()
