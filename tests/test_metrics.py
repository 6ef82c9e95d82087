"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import pytest

from peftlab.metrics import (
    classification_metrics,
    classification_report_dict,
    confusion,
    corpus_bleu,
    exact_match,
    generation_metrics,
    rouge_l,
)

# Three classes. Class 0: tp 1, fp 1, fn 1 -> F1 0.5. Class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8.
# Class 2: tp 0 -> F1 0. Accuracy 3/5.
Y_TRUE = [0, 0, 1, 1, 2]
Y_PRED = [0, 1, 1, 1, 0]


def test_accuracy_and_macro_f1_by_hand() -> None:
    out = classification_metrics(Y_TRUE, Y_PRED, num_labels=3)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_counts_a_class_absent_from_eval() -> None:
    # A fourth training label that never occurs in eval nor in predictions still counts (F1 0) in the mean.
    out = classification_metrics(Y_TRUE, Y_PRED, num_labels=4)
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0 + 0.0) / 4)


def test_confusion_matrix_by_hand() -> None:
    assert confusion(Y_TRUE, Y_PRED, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_per_class_report_by_hand() -> None:
    report = classification_report_dict(Y_TRUE, Y_PRED, ["neg", "pos", "neutral"])
    assert report["pos"]["precision"] == pytest.approx(2 / 3)
    assert report["pos"]["recall"] == pytest.approx(1.0)
    assert report["pos"]["f1-score"] == pytest.approx(0.8)
    assert report["neg"]["support"] == 2
    assert report["neutral"]["f1-score"] == 0.0


def test_classification_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)


def test_corpus_bleu_by_hand() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths (brevity penalty 1). BLEU = geometric mean * 100.
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, rel=1e-9)
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)


def test_corpus_bleu_pools_counts_over_the_corpus() -> None:
    # Pair 1 is perfect (n-gram counts 4/4, 3/3, 2/2, 1/1); pair 2 is as above (5/6, 3/5, 2/4, 1/3).
    # Corpus BLEU pools the counts: 9/10, 6/8, 4/6, 2/4 (not the mean of sentence scores).
    expected = 100 * math.exp((math.log(9 / 10) + math.log(6 / 8) + math.log(4 / 6) + math.log(2 / 4)) / 4)
    score = corpus_bleu(["w x y z", "the cat sat on the mat"], ["w x y z", "the cat sat on a mat"])
    assert score == pytest.approx(expected, rel=1e-9)


def test_rouge_l_by_hand() -> None:
    # Stemmed: hyp [the, cat, sat], ref [the, cat, was, sit]; LCS 2 -> P 2/3, R 1/2, F 4/7.
    assert rouge_l(["the cat sat"], ["the cat was sitting"]) == pytest.approx(4 / 7)
    # The mean over pairs.
    assert rouge_l(["the cat sat", "same words"], ["the cat was sitting", "same words"]) == pytest.approx(
        (4 / 7 + 1) / 2)


def test_exact_match_normalises_whitespace_only() -> None:
    assert exact_match(["Paris", "  Paris \n", "paris"], ["Paris", "Paris", "Paris"]) == pytest.approx(2 / 3)


def test_generation_metrics_keys_and_errors() -> None:
    out = generation_metrics(["a b c d"], ["a b c d"])
    assert out == {"bleu": pytest.approx(100.0), "rougeL": pytest.approx(1.0), "exact_match": 1.0}
    with pytest.raises(ValueError):
        rouge_l(["a"], [])
    with pytest.raises(ValueError):
        exact_match([], [])


def test_metric_functions_give_the_keys_the_tasks_declare() -> None:
    """The tasks' declared metrics (peftlab.tasks) are the keys these functions return."""
    from peftlab.tasks import get_task

    classification = get_task("classification")
    assert set(classification_metrics(Y_TRUE, Y_PRED, 3)) == {m.key for m in classification.metrics}
    generated = {m.key for m in get_task("instruction").metrics if m.generated}
    assert set(generation_metrics(["a b"], ["a b"])) == generated
