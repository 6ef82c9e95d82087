"""Metric functions: classification (scikit-learn) and generation (sacrebleu, rouge-score). Pure: no I/O.

Scales are those of the libraries, so that numbers compare with the literature:
accuracy, macro-F1, ROUGE-L and exact match are fractions in [0, 1]; BLEU is sacrebleu's 0-100 score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes (a class never predicted nor seen scores F1 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("no examples to score")
    labels = list(range(num_labels))
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}


def classification_report_dict(y_true: Sequence[int], y_pred: Sequence[int],
                               label_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support (scikit-learn's report), keyed by label name."""
    from sklearn.metrics import classification_report

    return classification_report(y_true, y_pred, labels=list(range(len(label_names))),
                                 target_names=[str(n) for n in label_names], output_dict=True, zero_division=0)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """Confusion matrix: row = true label id, column = predicted label id."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_labels))).tolist()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with one reference per hypothesis and its default 13a tokenizer."""
    import sacrebleu

    _same_length(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure (rouge-score, Porter stemming) of each pair, in [0, 1]."""
    from rouge_score import rouge_scorer

    _same_length(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(ref, hyp)["rougeL"].fmeasure) for hyp, ref in zip(hypotheses, references,
                                                                                    strict=True)]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over the pairs, in [0, 1]."""
    scores = rouge_l_scores(hypotheses, references)
    return float(sum(scores) / len(scores))


def normalize_whitespace(text: str) -> str:
    """Strip the ends and collapse runs of whitespace to one space."""
    return " ".join(text.split())


def exact_matches(hypotheses: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Whether each hypothesis equals its reference after whitespace normalisation (case kept)."""
    _same_length(hypotheses, references)
    return [normalize_whitespace(h) == normalize_whitespace(r) for h, r in zip(hypotheses, references, strict=True)]


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after whitespace normalisation (case kept)."""
    hits = exact_matches(hypotheses, references)
    return sum(hits) / len(hits)


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU, ROUGE-L and exact match of generations against references."""
    return {"bleu": corpus_bleu(hypotheses, references), "rougeL": rouge_l(hypotheses, references),
            "exact_match": exact_match(hypotheses, references)}


def _same_length(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no generations to score")
