"""A process with known threads for `kvprof attach --pid`: a step loop and real vLLM waits.

``python pyspy_workload.py SECONDS [stdlib]``

- MainThread runs ``execute_model`` (pure Python arithmetic standing in for a forward pass)
  and, after each step, hands a message to a reader, like an EngineCore feeding its worker.
- ``fed-reader`` loops on vLLM's real ``MessageQueue.dequeue(indefinite=True)``, as
  ``WorkerProc.worker_busy_loop`` does; fed every few ms, it spins in ``acquire_read`` /
  ``SpinCondition.wait`` / ``sched_yield`` between messages (the busy-wait).
- ``starved-reader`` does the same on a queue nobody writes to: after ``busy_loop_s`` (1 s)
  it blocks in the zmq poll.
- ``monitor`` waits on a threading.Event, like tqdm's monitor thread.

With ``stdlib`` no vLLM is imported: the readers block in ``queue.Queue.get`` instead.
Prints ``ready`` once every thread is in place.
"""

from __future__ import annotations

import queue
import sys
import threading
import time


def execute_model(n: int) -> int:
    """Stands in for a forward pass."""
    s = 0
    for i in range(n):
        s += i * i
    return s


def main() -> None:
    seconds = float(sys.argv[1])
    stdlib = len(sys.argv) > 2 and sys.argv[2] == "stdlib"
    if stdlib:
        fed: queue.Queue = queue.Queue()
        starved: queue.Queue = queue.Queue()
        readers = [fed, starved]

        def send(msg: object) -> None:
            fed.put(msg)

        def reader_loop(q) -> None:
            while True:
                q.get()
    else:
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

        fed_mq = MessageQueue(n_reader=1, n_local_reader=1)
        starved_mq = MessageQueue(n_reader=1, n_local_reader=1)
        readers = [MessageQueue.create_from_handle(q.export_handle(), 0)
                   for q in (fed_mq, starved_mq)]
        for writer, reader in zip((fed_mq, starved_mq), readers, strict=True):
            writer.wait_until_ready()
            reader.wait_until_ready()
        send = fed_mq.enqueue

        def reader_loop(q) -> None:
            while True:
                q.dequeue(indefinite=True)

    stop = threading.Event()
    for name, target, args in (("fed-reader", reader_loop, (readers[0],)),
                               ("starved-reader", reader_loop, (readers[1],)),
                               ("monitor", stop.wait, ())):
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    print("ready", flush=True)
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        execute_model(50_000)
        send(("step", step))
        step += 1


if __name__ == "__main__":
    main()
