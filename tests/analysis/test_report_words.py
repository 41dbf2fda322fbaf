"""One vocabulary: every stage, leg and span key has words, a colour and a process row; a key
nobody named yet still reads as words; tables in path order follow the request's path."""

from __future__ import annotations

import pytest

from kvprof import semconv as sc
from kvprof.analysis import legs as lg
from kvprof.analysis.views import words as w

LEG_IDS = sorted({m.id for c in lg.CHAINS.values() for m in c[1:]})


@pytest.mark.parametrize("key", sorted(lg.STAGES))
def test_every_stage_has_words_and_a_colour(key: str) -> None:
    assert w.words(key) == lg.STAGES[key] != key
    assert w.stage_colour(key).startswith("#")


@pytest.mark.parametrize("chain", sorted(lg.CHAINS))
def test_every_leg_has_words_and_a_process_row(chain: str) -> None:
    for m in lg.CHAINS[chain][1:]:
        assert w.leg_words(m.id, chain) == m.leg and "." not in w.leg_words(m.id, chain)[:1]
        assert w.leg_words("leg:" + m.id, chain) == m.leg
        assert w.process_of(m.id, chain) != "other", m.id


def test_spans_and_unknown_keys_read_as_words() -> None:
    for name in (*sc.PHASE_ORDER, sc.SPAN_DECODE_KV_WAIT, "unaccounted"):
        assert "." not in w.words(name), name
    assert w.words("kv.some_new_stage") == "kv some new stage"
    # A new stage gets a colour of its own, derived from its name (the same in every figure).
    colour = w.stage_colour("kv.some_new_stage")
    assert colour.startswith("hsl(") and colour not in w.STAGE_COLOURS.values()
    assert colour != w.stage_colour("kv.another_new_stage")


def test_path_order_follows_the_chain_asked_for() -> None:
    order = w.path_order("dynamo disaggregated")
    chain = [m.id for m in lg.CHAINS["dynamo disaggregated"][1:]]
    assert order[:len(chain)] == list(dict.fromkeys(chain))
    # The client's legs of a Dynamo request come first and last, not after the decode legs.
    assert order[0] == "frontend.recv" and order[len(chain) - 1] == "client.first"
