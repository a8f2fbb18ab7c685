"""Progress bars show only where someone watches: a terminal, global rank 0, not inside quiet() (--no-progress)."""
import io
import sys

from dopsd_fast.progress import progress, quiet


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_a_terminal(monkeypatch):
    """stderr a terminal, no launcher (in the test itself: pytest's capture resets sys.stderr after fixtures)."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("RANK", raising=False)


def shown(**kwargs) -> bool:
    with progress(total=1, desc="x", **kwargs) as bar:
        return not bar.disable


def test_a_bar_shows_on_rank_0_of_a_terminal(monkeypatch):
    on_a_terminal(monkeypatch)
    assert shown()
    assert not shown(enabled=False)            # the trainer's --no-progress (Trainer(progress=False))


def test_no_bar_in_a_log_file_on_other_ranks_or_when_quiet(monkeypatch):
    on_a_terminal(monkeypatch)
    with quiet():
        assert not shown()
    assert shown()                              # quiet() ends with its block
    monkeypatch.setenv("RANK", "1")
    assert not shown()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())     # not a terminal
    assert not shown()
