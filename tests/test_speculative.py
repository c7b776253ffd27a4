"""The acceptance replay (shipyard/speculative/acceptance.py) on tables worked out by hand; the figures a trained
MTP head or DFlash drafter gets from it are asserted in test_mtp.py and test_dflash.py."""

from shipyard.speculative.acceptance import (acceptance_per_position, answer_spans, block_table,
                                             mean_acceptance_length, perfect_table, replay_drafts)

CORRECT = [10, 11, 12, 13, 14, 15]  # the token at each position; the answer is positions 2..5


def test_answer_spans_are_the_runs_of_supervised_labels():
    assert answer_spans([-100, -100, 5, 6, -100, 7]) == [(2, 3), (5, 5)]
    assert answer_spans([-100, -100]) == []


def test_a_perfect_drafter_is_accepted_to_the_answer_end():
    table = perfect_table(CORRECT, 2, len(CORRECT))
    assert table == [[12, 13, 14, 15, -1, -1], [13, 14, 15, -1, -1, -1]]
    accepted = [0, 0]
    # Step after token 2: both drafts (13, 14) right, then the target's own token 5 ends the answer.
    assert replay_drafts(table, CORRECT, 2, 5, accepted) == 1
    assert accepted == [1, 1] and mean_acceptance_length(accepted, 1) == 3.0


def test_a_drafter_stops_at_its_first_wrong_token_and_at_the_answer_end():
    blocks = {2: [12, 13, 99], 3: [13, 14, 15], 4: [14, 15, 16]}  # slot j of the block at m: the token at m + j
    table = block_table(blocks, 3, len(CORRECT))
    assert table == [[-1, 13, 14, 15, -1, -1], [-1, 99, 15, 16, -1, -1]]
    accepted = [0, 0]
    # After token 2: 13 right, 99 wrong (14) -> next step after 4; after token 4: 15 right, depth 2 is past the end.
    drafts = replay_drafts(table, CORRECT, 2, 5, accepted)
    assert (drafts, accepted) == (2, [2, 0])
    assert acceptance_per_position(accepted, drafts) == [1.0, 0.0] and mean_acceptance_length(accepted, drafts) == 2.0
    # vLLM's raw counters also count drafts accepted past the answer's end, against what the target says there.
    raw = [0, 0]
    replay_drafts(table, CORRECT + [16, 0], 2, 5, raw, reach=7)
    assert raw == [2, 1]
