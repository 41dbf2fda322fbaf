"""instrument()/uninstrument() on the real vLLM classes: idempotent, exact restore, skips."""

from __future__ import annotations

import logging

import pytest

from kvprof.probes import hooks
from kvprof.probes.instrumentor import SCHED, Target, VllmInstrumentor

sched_mod = pytest.importorskip(SCHED)
Scheduler = sched_mod.Scheduler
NAMES = ("add_request", "schedule", "update_from_output", "finish_requests",
         "_free_request")


def _originals():
    return {n: Scheduler.__dict__[n] for n in NAMES}


def test_round_trip_restores_the_exact_originals():
    before = _originals()
    inst = VllmInstrumentor()
    events = []
    inst.instrument(emit=events.append)
    inst.instrument(emit=events.append)  # idempotent
    wrapped = _originals()
    assert all(wrapped[n] is not before[n] for n in NAMES)
    assert all(wrapped[n].__wrapped__ is before[n] for n in NAMES)
    inst.uninstrument()
    inst.uninstrument()  # idempotent
    assert _originals() == before and all(_originals()[n] is before[n] for n in NAMES)
    inst.instrument(emit=events.append)
    assert all(Scheduler.__dict__[n].__wrapped__ is before[n] for n in NAMES)
    inst.uninstrument()
    assert all(Scheduler.__dict__[n] is before[n] for n in NAMES)


def test_missing_hook_is_skipped_with_one_warning(caplog):
    class Partial(VllmInstrumentor):
        def targets(self):
            return super().targets() + [
                Target(SCHED, "Scheduler.no_such_method_in_this_vllm", hooks.scheduler_schedule)]

    inst = Partial()
    with caplog.at_level(logging.WARNING, logger="kvprof.probes.instrumentor"):
        inst.instrument()
        inst.uninstrument()
        inst.instrument()
    try:
        msgs = [r.getMessage() for r in caplog.records if "no_such_method" in r.getMessage()]
        assert len(msgs) == 1 and "skipped" in msgs[0]
        assert Scheduler.__dict__["schedule"].__wrapped__  # the others still work
    finally:
        inst.uninstrument()


def test_connector_class_hooks_round_trip():
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

    inst = VllmInstrumentor()
    inst.instrument()
    before = {n: NixlPullConnector.__dict__.get(n) for n in hooks.PROFILES["nixl"]}
    fake = object.__new__(NixlPullConnector)
    inst.instrument_connector(fake)
    inst.instrument_connector(fake)
    assert hooks.connector_profile(NixlPullConnector) == "nixl"
    assert hooks.connector_profile(ExampleConnector) == "example"
    for name in ("get_transfer_results", "request_finished_all_groups", "start_load_kv"):
        assert hasattr(NixlPullConnector.__dict__[name], "__wrapped__")
    inst.uninstrument()
    after = {n: NixlPullConnector.__dict__.get(n) for n in hooks.PROFILES["nixl"]}
    assert after == before
    # inherited methods were restored by deleting the subclass attribute, not copying it
    assert "get_transfer_results" not in NixlPullConnector.__dict__


def test_classmethod_target_is_restored_exactly_and_probes_call_through():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    before = KVConnectorFactory.__dict__["create_connector"]
    inst = VllmInstrumentor()
    inst.instrument()
    try:
        probed = KVConnectorFactory.__dict__["create_connector"]
        assert isinstance(probed, classmethod) and probed is not before
        assert probed.__func__.__wrapped__ is before.__func__
        assert KVConnectorFactory.create_connector.__name__ == "create_connector"
    finally:
        inst.uninstrument()
    assert KVConnectorFactory.__dict__["create_connector"] is before

    class Host:
        def method(self, a, b=2, **extra):
            return (self, a, b, extra)

    seen = []

    def factory(wrapped):
        def probe(self, *args, **kwargs):
            seen.append((args, kwargs))
            return wrapped(self, *args, **kwargs)
        return probe

    original = Host.__dict__["method"]
    inst2 = VllmInstrumentor()
    inst2.is_instrumented = True  # install one probe by hand, as instrument() would
    assert inst2._wrap(Host, "method", factory, "Host.method")
    assert inst2._wrap(Host, "method", factory, "Host.method")  # already there: no double
    h = Host()
    try:
        assert h.method(1, b=3, z=4) == (h, 1, 3, {"z": 4})  # same args, same result
        assert seen == [((1,), {"b": 3, "z": 4})]
        assert Host.method.__wrapped__ is original and len(inst2._patched) == 1
    finally:
        inst2.uninstrument()
    assert Host.__dict__["method"] is original


def test_a_probe_that_cannot_be_made_costs_its_hook_not_the_import(caplog):
    """A hook is made inside vLLM's import of its module (a post-import hook): a factory
    that raises (as the method copies did on Python 3.10, which lacks co_exceptiontable)
    must leave the method as it was and say so, not fail vLLM's import."""

    class Host:
        def method(self):
            return "original"

        @classmethod
        def make(cls):
            return "made"

    def broken(wrapped):
        raise AttributeError("'code' object has no attribute 'co_exceptiontable'")

    before = dict(Host.__dict__)
    inst = VllmInstrumentor()
    inst.is_instrumented = True
    with caplog.at_level(logging.WARNING, logger="kvprof.probes.instrumentor"):
        assert inst._wrap(Host, "method", broken, "Host.method") is False
        assert inst._wrap(Host, "make", broken, "Host.make") is False
    assert Host.__dict__["method"] is before["method"] and Host().method() == "original"
    assert Host.__dict__["make"] is before["make"] and Host.make() == "made"
    assert inst._patched == []
    warned = [r for r in caplog.records if "could not hook" in r.getMessage()]
    assert [r.getMessage() for r in warned] == [
        "kvprof: could not hook Host.method; that hook is skipped",
        "kvprof: could not hook Host.make; that hook is skipped"]
    assert all("co_exceptiontable" in str(r.exc_info[1]) for r in warned)
