"""Task metrics, all on a 0-100 scale: accuracy, macro-F1, MCC; ROUGE (F-measure), BLEU.

ROUGE comes from rouge-score (stemming on; multi-reference = best reference per example),
BLEU from sacrebleu (corpus BLEU, variable number of references; its signature is kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy (= exact match of the label), macro-F1 and Matthews correlation, x100.

    One class in labels and predictions alike (a tiny split) gives MCC 0, as defined;
    scikit-learn's warning about the confusion matrix's shape is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A single label was found",
                                category=UserWarning)
        mcc = matthews_corrcoef(labels, predictions)
    return {
        "accuracy": 100.0 * accuracy_score(labels, predictions),
        "macro_f1": 100.0 * f1_score(labels, predictions, average="macro", zero_division=0),
        "mcc": 100.0 * mcc,
    }


def generation_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float | str]:
    """ROUGE-1/2/L/Lsum F-measure x100 (best reference), corpus BLEU, exact match."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    exact = 0
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(list(refs), prediction)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
        exact += any(prediction.strip() == ref.strip() for ref in refs)
    count = max(len(predictions), 1)
    result: dict[str, float | str] = {k: 100.0 * v / count for k, v in totals.items()}
    width = max((len(r) for r in references), default=1)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.BLEU()
    result["bleu"] = bleu.corpus_score(list(predictions), streams).score
    result["bleu_signature"] = str(bleu.get_signature())
    result["exact_match"] = 100.0 * exact / count
    return result
