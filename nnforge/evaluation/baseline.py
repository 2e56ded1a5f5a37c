"""The linear baseline every text run is measured against: TF-IDF of word and character n-grams + logistic regression.

    b = text_baseline(train_texts, train_y, val_texts, val_y, test_texts, test_y)
    b["test_accuracy"], b["C"], b["seconds"]

Fitted on the run's own training split, its regularisation C picked on the validation split (or fixed when there
is none), scored on the same test items as the neural model. It takes seconds on a CPU and is hard to beat on a few
thousand texts: a neural model below it should say so plainly (evaluation/report.py shows both).
"""

from __future__ import annotations

import time

import numpy as np

C_GRID = (1.0, 4.0, 16.0)


def _features():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    # words and word pairs, plus character 2-5-grams inside word boundaries (robust to typos and to languages
    # written without spaces); sublinear tf as is usual for text classification
    return FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True)),
    ])


def text_baseline(train_x: list[str], train_y: list[str], val_x: list[str], val_y: list[str],
                  test_x: list[str], test_y: list[str]) -> dict:
    """Accuracy and macro F1 of TF-IDF (words 1-2, characters 2-5) + logistic regression on the test items."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.perf_counter()
    feats = _features()
    xtr = feats.fit_transform(train_x)
    grid = C_GRID if val_x else (4.0,)
    best = None
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, train_y)
        score = accuracy_score(val_y, clf.predict(feats.transform(val_x))) if val_x else 0.0
        if best is None or score > best[0]:
            best = (score, c, clf)
    val_acc, c, clf = best
    pred = clf.predict(feats.transform(test_x))
    return {"model": "tfidf(words 1-2, chars 2-5) + logistic regression", "C": c,
            "val_accuracy": float(val_acc) if val_x else None, "test_accuracy": float(accuracy_score(test_y, pred)),
            "test_macro_f1": float(f1_score(test_y, pred, average="macro")), "n_train": len(train_x),
            "n_test": len(test_x), "features": int(xtr.shape[1]), "seconds": round(time.perf_counter() - t0, 2),
            "predictions": [str(p) for p in np.asarray(pred)]}
