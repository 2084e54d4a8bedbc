"""What a text expresses, judged without the model, and where that judge is blind."""

from __future__ import annotations

import pytest
import torch

from emoscope.errors import MissingPackageError
from emoscope.expression import (
    MIN_AUC,
    concealment_report,
    coverage_auc,
    expressed,
    measure_coverage,
    observable,
)


def test_the_shipped_coverage_matches_the_corpus():
    from emoscope.corpus.records import load_stories

    stories = load_stories()
    shipped = coverage_auc()
    assert len(shipped) == 171
    sample = ["terrified", "vibrant", "sorry", "calm", "happy"]
    again = measure_coverage([s.text for s in stories], [s.emotion for s in stories], sample)
    for emotion in sample:
        assert again[emotion] == pytest.approx(shipped[emotion], abs=1e-3), emotion


def test_coverage_separates_what_the_lexicon_sees_from_what_it_cannot():
    assert observable("terrified") and coverage_auc()["terrified"] >= MIN_AUC
    # An apology or sympathy is expressed by what is said, not by emotion words.
    assert not observable("sorry") and not observable("sympathetic")
    n = sum(observable(e) for e in coverage_auc())
    assert 10 <= n < 171  # the measure is neither blind nor all-seeing


def test_naming_an_emotion_or_its_categories_expresses_it():
    emotions = ["terrified", "furious", "relaxed"]
    named = expressed("I was terrified of the dark.", emotions)
    assert float(named.levels[0]) == 1.0
    calm = expressed("We sat by the lake, breathing slowly, at ease and content.", emotions)
    assert float(calm.levels[2]) > float(calm.levels[0])


def test_sympathy_is_not_reported_as_concealed():
    """An assistant's apology carries sympathy the lexicon cannot see: no gap, stated coverage."""
    emotions = ["sorry", "sympathetic", "terrified", "calm"]
    internal = torch.tensor([2.8, 4.2, 3.0, 0.5])
    report = concealment_report(emotions, internal, "I'm so sorry. That sounds really stressful.")
    assert report["gap"]["sorry"] is None and report["gap"]["sympathetic"] is None
    assert set(report["unobservable"]) >= {"sorry", "sympathetic"}
    assert [e for e, _ in report["top_gaps"]] == ["terrified", "calm"]
    level = report["expressed"]["terrified"]  # a stressful text reads somewhat fearful
    assert 0 < level < 1 and report["gap"]["terrified"] == pytest.approx(3.0 * (1 - level))
    assert report["coverage"] == {"observable": 2, "total": 4}


def test_missing_lexicon_names_the_extra(monkeypatch):
    import emoscope.lexicons as lexicons

    def absent(*_args, **_kwargs):
        raise MissingPackageError("no nrclex")

    monkeypatch.setattr(lexicons, "package_file", absent)
    lexicons.nrc_lexicon.cache_clear()
    try:
        with pytest.raises(MissingPackageError, match=r"emoscope\[expression\]"):
            lexicons.nrc_lexicon()
    finally:
        monkeypatch.undo()
        lexicons.nrc_lexicon.cache_clear()
