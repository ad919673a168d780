"""Suite-wide set-up, before any test module is imported."""

import signal
from collections.abc import Iterator

import pytest

# A script's background job starts with SIGINT ignored, and an ignored signal stays
# ignored across exec: the command-line tools these tests interrupt as Ctrl-C would then
# never see it (ci-local started from a script failed so). A handled SIGINT is reset to
# the default in a child, as a terminal's foreground process has it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_as_it_was() -> Iterator[None]:
    """A command run in-process may ignore SIGINT once its work is done (artifact diff,
    patch); the suite's later children must not inherit that."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) != before:
        signal.signal(signal.SIGINT, before)
