"""parse_python: Python text parses alike while other threads parse at the same time."""
from __future__ import annotations

import ast
import gc
import threading

from cycleqd.bounded import parse_python


def test_parse_python_survives_threads_parsing_during_a_collection() -> None:
    """A GC callback that runs Python code lets another thread in while a tree is built; in
    CPython 3.11 that spoils the shared depth counter and ``ast.parse`` raises SystemError.
    parse_python gives the right tree every time, and leaves the collector as it found it."""
    text = "[" + ",".join(["1"] * 1999) + "]"
    want = ast.dump(ast.parse(text, mode="eval"))
    stop = threading.Event()
    errors: list[BaseException] = []

    def other_thread(depth: int) -> None:  # parse from a different stack depth than the main thread
        if depth:
            return other_thread(depth - 1)
        while not stop.is_set():
            try:
                parse_python("[" + ",".join(["(1, 2)"] * 500) + "]", mode="eval")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    def busy_callback(*_: object) -> None:
        sum(range(2000))

    gc.callbacks.append(busy_callback)
    thread = threading.Thread(target=other_thread, args=(20,), daemon=True)
    thread.start()
    try:
        for _ in range(300):
            gc.collect(0)  # the callback runs on every collection, as it would in a worker
            assert ast.dump(parse_python(text, mode="eval")) == want
    finally:
        stop.set()
        thread.join()
        gc.callbacks.remove(busy_callback)
    assert not errors, errors[:3]
    assert gc.isenabled()
