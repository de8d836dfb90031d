from server.engines.prompt_lookup import propose_draft


def test_draft_is_what_followed_the_last_ngram():
    ids = [1, 2, 3, 4, 5, 9, 2, 3]
    assert propose_draft(ids, max_draft=3) == [4, 5, 9]


def test_longest_ngram_wins_over_a_nearer_shorter_one():
    # "7 2 3" occurred at the start; "2 3" alone occurs later with another follower.
    ids = [7, 2, 3, 10, 11, 0, 2, 3, 20, 21, 7, 2, 3]
    assert propose_draft(ids, max_ngram=3, max_draft=2) == [10, 11]


def test_nearest_occurrence_wins_among_equal_lengths():
    ids = [2, 3, 10, 0, 2, 3, 20, 0, 2, 3]
    assert propose_draft(ids, max_ngram=2, max_draft=1) == [20]
    assert propose_draft(ids[:-3] + [5, 2, 3], max_ngram=2, max_draft=2) == [20, 5]


def test_no_draft_without_a_repeat_or_below_min_ngram():
    assert propose_draft([1, 2, 3, 4]) == []
    assert propose_draft([1, 5, 6, 1], min_ngram=2) == []
    assert propose_draft([1, 5, 6, 1], min_ngram=1, max_draft=2) == [5, 6]
    assert propose_draft([], max_draft=4) == []
    assert propose_draft([1, 2, 1, 2], max_draft=0) == []


def test_draft_is_capped_and_may_run_into_the_tail():
    ids = [4, 5, 4, 5]
    # The match at 0 is followed by the tail itself: proposing it is still a valid guess.
    assert propose_draft(ids, max_draft=8) == [4, 5]
