"""What both servers do with a trace export: bound it, decode it, screen it, queue it."""

from __future__ import annotations

import threading

from kvprof.receiver import payload as pl
from kvprof.receiver.payload import Rejection, Screened
from kvprof.receiver.queue import PayloadQueue
from kvprof.receiver.stats import ReceiverStats
from kvprof.receiver.store import StoreWriter


class Intake:
    """The shared path from a received body to the writer's queue; counts every outcome."""

    def __init__(self, queue: PayloadQueue, stats: ReceiverStats, writer: StoreWriter,
                 max_payload_bytes: int):
        self.queue = queue
        self.stats = stats
        self.writer = writer
        self.max_payload_bytes = max_payload_bytes
        self._json_lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Claim room for a body of nbytes before reading it; raises Rejection otherwise."""
        if nbytes > self.max_payload_bytes:
            raise Rejection(pl.TOO_LARGE, f"payload of {nbytes} bytes is over the "
                            f"receiver's limit of {self.max_payload_bytes} bytes")
        why = self.writer.failing()
        if why:
            raise Rejection(pl.UNAVAILABLE, f"{why}; retry later")
        if not self.queue.reserve(nbytes):
            raise Rejection(pl.UNAVAILABLE, self._full_message())

    def take(self, body: bytes, fmt: str, gzip: bool, reserved: int) -> Screened:
        """Decode a body read under a reservation and queue its spans.

        The reservation is handed to the queue on success and released on a Rejection, so a
        caller only has to release it if take() itself never ran.
        """
        held = reserved
        try:
            if gzip:
                body = self._gunzip(body, held)
                held = self._resize(held, len(body))
            if fmt == pl.JSON:
                # A JSON body becomes Python objects ten times its size while it is parsed:
                # one at a time keeps that a constant, not a multiple of the senders.
                with self._json_lock:
                    request = pl.decode_json(body)
                wire = None
            else:
                request = pl.decode_protobuf(body)
                wire = body
            del body
            screened = pl.screen(request, wire)
            del request
            held = self._resize(held, len(screened.data))
            if screened.spans and not self.queue.put((screened.data, screened.spans), held):
                raise Rejection(pl.UNAVAILABLE, "the receiver is shutting down; retry later")
            if not screened.spans:
                self.queue.release(held)
        except BaseException:
            self.queue.release(held)
            raise
        self.stats.accepted(screened.spans, screened.rejected)
        return screened

    def _gunzip(self, body: bytes, held: int) -> bytes:
        # Inflate no further than the queue has room for, so a burst of small gzip bodies
        # cannot inflate past the bound before their reservations are resized.
        room = min(self.max_payload_bytes, self.queue.room() + held)
        try:
            return pl.gunzip(body, room)
        except Rejection as exc:
            if exc.reason == pl.TOO_LARGE and room < self.max_payload_bytes:
                raise Rejection(pl.UNAVAILABLE, self._full_message()) from None
            raise

    def _resize(self, held: int, n: int) -> int:
        if not self.queue.resize(held, n):
            raise Rejection(pl.UNAVAILABLE, self._full_message())
        return n

    def _full_message(self) -> str:
        return (f"the receiver's queue is full ({self.queue.used} of {self.queue.max_bytes} "
                "bytes waiting to be written); retry later")
