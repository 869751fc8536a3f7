"""The length-generalisation study (``python -m fused_posenc.study``): its tasks say what they claim, and
``--quick`` runs the whole pipeline (train, evaluate, resumable CSV, table, plot) as CI's smoke test."""
import csv
import json
import os

import pytest
import torch

from fused_posenc.study import tasks
from fused_posenc.study.cli import main
from fused_posenc.study.train import ENCODINGS, StudyConfig, build_model, evaluate


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("length", [31, 128, 1000])
def test_passkey_answer_is_the_hidden_key(length):
    x, y = tasks.make_batch("passkey", 6, length, _gen())
    assert x.shape == y.shape == (6, length)
    n = tasks.PASSKEY_DIGITS
    for row_x, row_y in zip(x, y):
        mark = (row_x == tasks.MARK).nonzero().flatten()
        assert len(mark) == 1
        key = row_x[mark[0] + 1:mark[0] + 1 + n]
        assert all(int(t) in tasks.DIGITS for t in key)
        scored = (row_y != -100).nonzero().flatten()
        assert scored.tolist() == list(range(length - n - 1, length - 1))
        assert torch.equal(row_y[scored], key)          # the targets are the passkey ...
        assert torch.equal(row_x[scored + 1], key)      # ... and the next tokens (teacher forcing)
        assert int(row_x[length - n - 1]) == tasks.QUERY
        # everything else is the repeated filler sentence
        rest = torch.ones(length, dtype=torch.bool)
        rest[mark[0]:mark[0] + 1 + n] = False
        rest[length - n - 1:] = False
        assert all(int(t) in tasks.WORDS for t in row_x[rest])


@pytest.mark.parametrize("length", [64, 200, 2048])
def test_recall_queries_the_pairs_in_the_context(length):
    x, y = tasks.make_batch("recall", 5, length, _gen(1))
    n = tasks.RECALL_PAIRS
    for row_x, row_y in zip(x, y):
        context = row_x[:length - 3 * n]
        is_key = (context >= tasks.KEYS.start) & (context < tasks.KEYS.stop)
        pairs = {int(context[i]): int(context[i + 1]) for i in is_key.nonzero().flatten()}
        assert len(pairs) == n and is_key.sum() == n                     # n distinct keys, each once
        assert all(int(v) in tasks.VALUES for v in pairs.values())
        scored = (row_y != -100).nonzero().flatten()
        assert len(scored) == n and scored.min() >= length - 3 * n
        assert sorted(int(row_x[i]) for i in scored) == sorted(pairs)   # every key queried once
        for i in scored:
            assert int(row_y[i]) == pairs[int(row_x[i])] == int(row_x[i + 1])
            assert int(row_x[i - 1]) == tasks.QUERY


def test_lm_targets_are_the_next_tokens_and_sentences_repeat():
    x, y = tasks.make_batch("lm", 3, 300, _gen(2))
    assert torch.equal(x[:, 1:], y[:, :-1])
    s = tasks.LM_SENTENCE + 1
    for row in x:
        sentences = {tuple(row[i:i + s].tolist()) for i in range(0, 300 - s, s)}
        assert len(sentences) <= tasks.LM_POOL                         # drawn from the document's pool
        assert all(sent[-1] == tasks.SEP for sent in sentences)


def test_batches_are_reproducible_and_bad_arguments_raise():
    for task in tasks.TASKS:
        a = tasks.make_batch(task, 2, 96, _gen(5))
        b = tasks.make_batch(task, 2, 96, _gen(5))
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert int(a[0].max()) < tasks.VOCAB and int(a[0].min()) >= 0
    with pytest.raises(ValueError, match="task"):
        tasks.make_batch("copy", 2, 96)
    with pytest.raises(ValueError, match="length"):
        tasks.make_batch("recall", 2, 32)
    with pytest.raises(ValueError, match="encoding"):
        build_model("rope2", StudyConfig.quick())


def test_models_differ_only_in_encoding():
    cfg = StudyConfig.quick()
    counts = {}
    for e in ENCODINGS:
        torch.manual_seed(0)
        m = build_model(e, cfg, backend="torch")
        counts[e] = sum(p.numel() for n, p in m.named_parameters() if "encoding" not in n)
        learnable = [n for n, p in m.named_parameters() if "encoding" in n and p.requires_grad]
        assert bool(learnable) == (e == "fope-learnable"), e
    assert len(set(counts.values())) == 1, counts


def test_evaluation_scores_a_perfect_predictor_perfectly():
    """``evaluate`` against an oracle that reads the answer off the next input token: accuracy 1, loss ~0
    (so a bug that misaligns targets and logits, or scores padding, fails here)."""
    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)
            return torch.nn.functional.one_hot(nxt, tasks.VOCAB).float() * 50.0

    cfg = StudyConfig.quick()
    for task in tasks.TASKS:
        res = evaluate(Oracle(), task, 96, cfg)
        if task == "lm":  # the last position's target is outside the input: the oracle guesses
            assert res["accuracy"] > 0.98
        else:
            assert res["accuracy"] == 1.0 and res["loss"] < 1e-6, (task, res)


def test_quick_study_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert main(["--quick", "--out", out, "--seeds", "1", "--backend", "cpu"]) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    cfg = StudyConfig.quick()
    assert len(rows) == len(ENCODINGS) * len(tasks.TASKS) * len(cfg.eval_factors)
    assert {r["encoding"] for r in rows} == set(ENCODINGS)
    for r in rows:
        v = float(r["value"])
        assert (0.0 <= v <= 1.0) if r["metric"] == "accuracy" else (v > 0.0)
    md = open(os.path.join(out, "results.md")).read()
    for e in ENCODINGS:
        assert f"| {e} |" in md
    assert "python -m fused_posenc.study --quick" in md
    with open(os.path.join(out, "plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.load(open(os.path.join(out, "run.json")))
    assert [r["models"] for r in meta["runs"]] == [len(ENCODINGS) * len(tasks.TASKS)]
    assert meta["config"]["steps"] == cfg.steps
    capsys.readouterr()
    # a second run trains nothing; a third with one more seed trains only the new cells
    assert main(["--quick", "--out", out, "--seeds", "1", "--backend", "cpu"]) == 0
    assert "0 to train" in capsys.readouterr().out
    assert main(["--quick", "--out", out, "--seeds", "2", "--backend", "cpu", "--tasks", "lm",
                 "--encodings", "rope"]) == 0
    with open(os.path.join(out, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows) + len(cfg.eval_factors)
    meta = json.load(open(os.path.join(out, "run.json")))
    assert [r["models"] for r in meta["runs"]] == [len(ENCODINGS) * len(tasks.TASKS), 1]
    assert "resumed with: `python -m fused_posenc.study --quick" in open(os.path.join(out, "results.md")).read()
    # another configuration in the same folder is refused, not mixed in
    with pytest.raises(SystemExit, match="another configuration"):
        main(["--quick", "--out", out, "--steps", "3"])
