"""A pool of P processes joined in one gloo group, kept for a whole test module, so that each hypothesis
example costs a message, not a process start. A case is a function of tests/parallel_cases.py called on
every rank with the same arguments; each rank returns a value or the exception it raised. The group's
collective timeout (30 s) and the pool's own wait (90 s) turn a hang into a failure."""

import datetime
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
WAIT_S = 90


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, inbox, outbox):
    import parallel_cases
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    parallel_cases.setup(world)
    while True:
        task = inbox.get()
        if task is None:
            break
        name, args = task
        try:
            outbox.put((rank, True, getattr(parallel_cases, name)(*args)))
        except Exception as exc:  # the test inspects it
            outbox.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world):
        self.world = world
        self._start()

    def _start(self):
        ctx = mp.get_context("spawn")
        world = self.world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, case, *args):
        """[(ok, value or (exception type name, message, traceback))] per rank, in rank order."""
        for inbox in self.inboxes:
            inbox.put((case, args))
        results = [None] * self.world
        for _ in range(self.world):
            try:
                rank, ok, value = self.outbox.get(timeout=WAIT_S)
            except queue.Empty:
                self.close()
                self._start()  # fresh ranks for the next case: these may still be stuck
                raise AssertionError(f"{case}{args}: a rank did not answer within {WAIT_S} s (a hang)") from None
            results[rank] = (ok, value)
        return results

    def values(self, case, *args):
        """Every rank's value; a rank's exception fails the test with its traceback."""
        out = []
        for rank, (ok, value) in enumerate(self.run(case, *args)):
            if not ok:
                raise AssertionError(f"rank {rank} raised in {case}:\n{value[2]}")
            out.append(value)
        return out

    def close(self):
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _report(target, rank, port, errors):
    try:
        target(rank, port)
    except BaseException as exc:  # reported to the parent, then re-raised for the exit code
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise


def spawn_ranks(target, world, timeout=WAIT_S * 2):
    """Runs target(rank, port) (a module-level function) in `world` fresh processes, for tests that need
    a process group of their own; fails with every rank's traceback, or when a rank hangs or dies."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_report, args=(target, r, port, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not hung, f"ranks {hung} did not finish in {timeout} s\n" + "\n".join(messages)
    assert not messages and all(p.exitcode == 0 for p in procs), "\n".join(messages) or "a rank died"

