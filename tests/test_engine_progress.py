"""When the sidecar sends a run's aggregate back (sidecar/progress.py): once every matrix of the
manifest has its check of a step stored and none a later one, once per step, in increasing steps;
a newer incarnation starts afresh and an older one is ignored."""

from __future__ import annotations

from deltawatch.sidecar.progress import CheckProgress


def test_a_step_completes_when_every_matrix_has_it():
    p = CheckProgress()
    assert [p.stored("r", 1, 3, m, 10) for m in "abc"] == [False, False, True]
    assert p.stored("r", 1, 3, "c", 10) is False  # the same step again: not newer
    assert [p.stored("r", 1, 3, m, 20) for m in "ab"] == [False, False]
    assert p.stored("r", 1, 3, "a", 30) is False  # a runs ahead: 20 can no longer complete alone
    assert p.stored("r", 1, 3, "c", 20) is False  # a at 30, b and c at 20: mixed, nothing sent
    assert [p.stored("r", 1, 3, m, 30) for m in "bc"] == [False, True]
    assert p.stored("other", 1, 1, "x", 5) is True  # runs are independent


def test_a_newer_incarnation_starts_afresh_and_an_older_one_is_ignored():
    p = CheckProgress()
    assert [p.stored("r", 1, 2, m, 40) for m in "ab"] == [False, True]
    # Resumed from step 20: its steps are lower than the last completed one, and still complete.
    assert [p.stored("r", 2, 2, m, 30) for m in "ab"] == [False, True]
    assert p.stored("r", 1, 2, "a", 50) is False
    assert p.stored("r", 1, 2, "b", 50) is False
