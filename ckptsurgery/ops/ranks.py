"""Several processes writing one output together, under torchrun: every rank reads the inputs
and plans the output identically, writes its share of the files (file `i` is rank `i %
WORLD_SIZE`'s), and the ranks agree through a gloo process group at three fixed steps:

- `checked`:   the output may be written (every rank checked it; rank 0 may hand the others
               something, the staged DCP folder they write into);
- `written`:   every rank has staged its files (they hand rank 0 their staged names);
- `committed`: rank 0 has renamed everything into place, the index or `.metadata` last.

Every rank takes part in every step, even one that failed earlier: a failing rank casts its
error in the steps it has not reached (`finish`), so the others learn of it at their next step
instead of waiting for it. The first step that carries an error ends the protocol on all ranks
alike: each removes what it staged and fails with one line naming the rank. torch.distributed is
imported only here, and only when WORLD_SIZE > 1."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from typing import Any, Callable, Iterator

from ..errors import CkptError, UsageError

STEPS = ("checked", "written", "committed")

# Whether this process joined a process group. torch 2.13's gloo now and then aborts a process
# at interpreter exit ("terminate called without an active exception", after the group is
# destroyed and the work done): the command line then leaves with os._exit (cli.main).
joined = False


def describe(error: BaseException) -> str:
    """An error as the one line the command line would print for it."""
    if isinstance(error, CkptError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return f"{type(error).__name__}: {error}"


class Ranks:
    """This process's place in a torchrun job, and the three steps where the ranks agree.
    `exchange(value)` gives every rank's value, in rank order (an all-gather)."""

    def __init__(self, rank: int, world_size: int, exchange: Callable[[Any], list]):
        self.rank, self.world_size = rank, world_size
        self._exchange = exchange
        self._next = 0  # the step this rank reaches next
        self._over = False  # a step carried an error: no rank takes another

    @property
    def leader(self) -> bool:
        """Rank 0: it checks what the others cannot share, renames everything into place and
        writes the index or .metadata."""
        return self.rank == 0

    def owns(self, number: int) -> bool:
        """Whether this rank writes output file `number` (0-based, in the output's order)."""
        return number % self.world_size == self.rank

    def step(self, name: str, value: Any = None) -> list:
        """Reach step `name` with `value`; every rank's value, in rank order. Raises if a rank
        failed before reaching it."""
        return self._vote(name, None, value)

    def finish(self, error: BaseException | None) -> None:
        """Cast the steps this rank has not reached: as failed with `error`, or (a dry run, a
        rank with nothing left to do) as done — and then learn whether another rank failed."""
        message = None if error is None else describe(error)
        while not self._over and self._next < len(STEPS):
            self._vote(STEPS[self._next], message, None)

    def leave(self) -> None:
        """Wait until every rank is done, its staged files removed or renamed: torchrun stops
        the other ranks as soon as one exits with an error, which would cut their cleanup
        short (a staged folder half removed). A rank out of reach is not waited for."""
        try:
            self._exchange(None)
        except Exception:
            pass

    def _vote(self, name: str, error: str | None, value: Any) -> list:
        if self._over or STEPS[self._next] != name:
            raise RuntimeError(f"step {name!r} out of order (next: {STEPS[self._next:]}, over: {self._over})")
        self._next += 1
        try:
            answers = self._exchange((error, value))
        except Exception as e:  # a rank died, or the network between them
            self._over = True
            if name != "committed":
                outcome = "nothing was written"
            elif self.leader:  # it reaches this step only once everything is in place
                outcome = "the output is in place, whole"
            else:
                outcome = "rank 0 may or may not have put the output in place: look before using it"
            raise CkptError(f"rank {self.rank}: lost contact with the other ranks at step {name!r} ({e}); "
                            f"{outcome}") from None
        failed = [(rank, message) for rank, (message, _) in enumerate(answers) if message is not None]
        if failed:
            self._over = True
            if error is None:
                rank, message = failed[0]
                # at the last step only rank 0 acts: its own line says what became of the output
                outcome = "failed while putting the output in place" if name == "committed" else \
                    "failed, so nothing was written"
                raise CkptError(f"rank {rank} of {self.world_size} {outcome}: {message}")
        return [value for _, value in answers]


def _all_gather_json(dist, value: Any) -> list:
    """Every rank's `value` (JSON: tuples come back as lists), in rank order. Sent as JSON bytes
    in uint8 tensors — not all_gather_object, which unpickles what the other processes send:
    nothing this tool reads is unpickled by anything but its restricted unpickler."""
    import torch

    data = json.dumps(value).encode()
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64))
    longest = max(int(n) for n in lengths)
    mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    theirs = [torch.empty_like(mine) for _ in lengths]
    dist.all_gather(theirs, mine)
    import ctypes  # here: every command imports this module, few gather

    return [json.loads(ctypes.string_at(t.data_ptr(), int(n))) for t, n in zip(theirs, lengths)]


def _number(name: str, text: str) -> int:
    """An environment variable torchrun sets to a whole number, as that number."""
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a number (torchrun sets it)") from None


def world_size(environ=os.environ) -> int:
    """WORLD_SIZE as torchrun sets it; 1 when it is not set."""
    text = environ.get("WORLD_SIZE", "1")
    size = _number("WORLD_SIZE", text)
    if size < 1:
        raise UsageError(f"WORLD_SIZE={text!r} must be 1 or more")
    return size


def check_rank(environ, size: int) -> int:
    """RANK as torchrun sets it: a whole number in [0, WORLD_SIZE). Anything else would wait for a
    rendezvous that cannot happen."""
    text = environ.get("RANK")
    if text is None:
        raise UsageError(f"WORLD_SIZE={size} but RANK is not set: run the command under torchrun, which sets both")
    rank = _number("RANK", text)
    if not 0 <= rank < size:
        raise UsageError(f"RANK={text!r} must be 0 to {size - 1}, below WORLD_SIZE={size} (torchrun sets both)")
    return rank


DEFAULT_TIMEOUT = 120.0  # seconds the ranks wait for each other: at the rendezvous and at every step


def check_timeout(seconds) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 86_400 \
            or seconds != seconds:
        raise UsageError(f"--rank-timeout {seconds!r}: give seconds, more than 0 and less than a day")
    return float(seconds)


@contextmanager
def ranks_from_environment(environ=os.environ, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Ranks | None]:
    """The ranks of the torchrun job this process is part of (a gloo process group from
    MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE), or None when WORLD_SIZE is 1 or unset.
    The block's failure is cast to the other ranks; its success waits for theirs. `timeout`:
    how long, in seconds, a rank waits for the others (to join, and at each step) before it
    fails with one line."""
    timeout = check_timeout(timeout)  # checked alone too: an option is never silently taken
    size = world_size(environ)
    if size == 1:
        yield None
        return
    check_rank(environ, size)
    # torch's C++ logger prints a stack trace for each failed connection attempt: one line is ours
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    import datetime

    import torch.distributed as dist

    global joined
    joined = True
    try:
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    except (ValueError, RuntimeError) as e:  # a missing MASTER_ADDR, an unreachable rank 0, a rank that never came
        raise CkptError(f"cannot join the other ranks within {timeout:g} s ({str(e).splitlines()[0][:200]}); "
                        f"are all WORLD_SIZE ranks started? (--rank-timeout sets the wait)") from None

    def exchange(value: Any) -> list:
        return _all_gather_json(dist, value)

    ranks = Ranks(dist.get_rank(), dist.get_world_size(), exchange)
    leave_together = True
    try:
        try:
            yield ranks
        except Exception as e:
            try:
                ranks.finish(e)
            except CkptError:  # the others are out of reach: this rank's own error says more
                pass
            _hold_sigterm()
            raise
        ranks.finish(None)
    except BaseException as e:
        leave_together = isinstance(e, Exception)  # Ctrl-C and SIGTERM leave at once (torchrun stops the rest)
        raise
    finally:
        if leave_together:
            ranks.leave()
        dist.destroy_process_group()


def _hold_sigterm() -> None:
    """A failed rank's cleanup is done and only its error line is left to print: torchrun's
    SIGTERM, sent as soon as the first rank exits, would cut that line off (a busy machine
    schedules the ranks far apart). Ignored from here on; the process exits right after."""
    import signal

    with suppress(ValueError):  # not the main thread: nothing to hold
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
