"""sparsegrid.progress: a tqdm bar on a terminal, a silent stand-in with tqdm's methods
elsewhere (or without tqdm); and the examples' training loop using it."""

import io
import pathlib
import subprocess
import sys

import pytest

from optional import require
from sparsegrid import progress as progress_module
from sparsegrid.progress import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


class Closed(io.StringIO):
    def isatty(self):
        raise ValueError("I/O operation on closed file")


def test_silent_off_a_terminal(capsys):
    stream = io.StringIO()
    bar = progress(range(5), desc="work", file=stream)
    assert isinstance(bar, progress_module._Silent)
    assert list(bar) == [0, 1, 2, 3, 4] and bar.n == 5
    assert len(bar) == 5 and bar.total == 5 and bar.disable
    bar.set_postfix_str("loss 1")
    bar.set_postfix(loss=1)
    bar.set_description("x")
    bar.set_description_str("x")
    bar.refresh()
    bar.clear()
    bar.close()
    assert stream.getvalue() == ""
    # stderr (the default stream) under pytest's capture is not a terminal either
    list(progress(range(3), desc="default"))
    assert capsys.readouterr() == ("", "")
    assert isinstance(progress(range(2), file=Closed()), progress_module._Silent)


def test_a_bar_on_a_terminal_or_when_enabled():
    tqdm = require("tqdm")
    terminal = Terminal()
    assert list(progress(range(4), desc="epoch", file=terminal)) == [0, 1, 2, 3]
    assert "epoch:   0%" in terminal.getvalue() and "0/4" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r")          # leave=False: cleared at the end
    kept = Terminal()
    list(progress(range(4), desc="epoch", file=kept, leave=True))
    assert "4/4" in kept.getvalue()
    stream = io.StringIO()
    bar = progress(range(3), desc="forced", unit="batch", enable=True, file=stream)
    assert isinstance(bar, tqdm.tqdm)
    list(bar)
    assert "forced" in stream.getvalue() and "0/3" in stream.getvalue() \
        and "batch" in stream.getvalue()
    quiet = Terminal()
    assert isinstance(progress(range(3), enable=False, file=quiet), progress_module._Silent)
    assert quiet.getvalue() == ""
    # tqdm keyword arguments reach tqdm, the default dynamic_ncols included
    bar = progress(total=10, enable=True, file=io.StringIO(), dynamic_ncols=False,
                   initial=4, ncols=40)
    assert bar.n == 4 and bar.ncols == 40 and not bar.dynamic_ncols
    bar.close()


@pytest.mark.parametrize("enable", [False, True])
def test_context_manager_and_manual_counter(enable):
    if enable:
        require("tqdm")
    stream = io.StringIO()
    with progress(total=10, desc="count", enable=enable, file=stream) as bar:
        bar.update(3)
        bar.update()
        bar.update(6)
        assert bar.n == 10 and bar.total == 10
        bar.reset(total=20)
        assert bar.n == 0 and bar.total == 20
    assert bool(stream.getvalue()) == enable
    silent = progress(total=5, initial=2, enable=False)
    assert silent.n == 2


@pytest.mark.parametrize("enable", [False, True])
def test_write_goes_to_stdout_as_tqdms_does(enable, capsys):
    if enable:
        require("tqdm")
    bar = progress(total=2, enable=enable, file=io.StringIO())
    bar.write("a message")
    bar.write("to stderr", file=sys.stderr, nolock=True)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "a message\n" and err == "to stderr\n"


def test_without_tqdm_silent_and_no_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    for stream in (Terminal(), io.StringIO()):
        bar = progress(range(3), enable=True, file=stream)
        assert isinstance(bar, progress_module._Silent)
        assert list(bar) == [0, 1, 2]
        bar = progress(range(3), file=stream)
        assert isinstance(bar, progress_module._Silent) and stream.getvalue() == ""


def test_silent_stand_in_has_what_the_bar_has():
    tqdm = require("tqdm")
    silent = progress(range(2), enable=False)
    bar = tqdm.tqdm(range(2), disable=True)
    for name in ("update", "set_postfix", "set_postfix_str", "set_description",
                 "set_description_str", "refresh", "clear", "reset", "write", "close",
                 "__enter__", "__exit__", "__iter__", "__len__", "n", "total", "disable"):
        assert hasattr(silent, name) and hasattr(bar, name), name
    assert (silent.n, silent.total, silent.disable) == (bar.n, bar.total, bar.disable)


def test_importing_loads_neither_tqdm_nor_matplotlib():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, sparsegrid, sparsegrid.progress, "
         "sparsegrid.plot\nlist(sparsegrid.progress.progress(range(3)))\n"
         "print(int('tqdm' in sys.modules), int('matplotlib' in sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out == ["0", "0"]


# -- examples/train_utils.fit --------------------------------------------------------------
def train(monkeypatch, stderr, epochs=2):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import train_utils
    from nn_helpers import toy_batch, toy_model
    from sparsegrid.nn.optim import SGD
    inputs, labels = toy_batch()
    model = toy_model()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    monkeypatch.setattr(sys, "stderr", stderr)
    lines = []
    history = train_utils.fit(model, optimizer, lambda epoch: [(inputs, labels)] * 3,
                              lambda: [(inputs, labels)], epochs, log=lines.append)
    return history, lines


def test_fit_logs_its_lines_and_draws_no_bar_off_a_terminal(monkeypatch):
    stderr = io.StringIO()
    history, lines = train(monkeypatch, stderr)
    assert stderr.getvalue() == ""
    assert len(lines) == 2 and [r["epoch"] for r in history] == [1, 2]
    for line, record in zip(lines, history):
        assert line.startswith(f"epoch {record['epoch']:2d}/2  loss {record['loss']:.4f}  "
                               f"train {100 * record['train_accuracy']:5.1f}%  held-out "
                               f"{100 * record['test_accuracy']:5.2f}%  lr 0.05  ")
        assert line.endswith(" ms per batch)") and "(forward " in line
    assert set(history[0]) == {"epoch", "loss", "train_accuracy", "test_accuracy",
                               "seconds", "forward_ms", "backward_ms", "lr"}


def test_fit_draws_a_tqdm_bar_on_a_terminal(monkeypatch):
    require("tqdm")
    terminal = Terminal()
    _, lines = train(monkeypatch, terminal)
    drawn = terminal.getvalue()
    assert "epoch  1/2:" in drawn and "epoch  2/2:" in drawn and "0/3" in drawn
    assert "batch/s" in drawn
    assert len(lines) == 2


def test_no_hand_written_bar_is_left_in_the_examples():
    for path in (ROOT / "examples").glob("*.py"):
        text = path.read_text()
        assert "class Progress" not in text and "Progress(" not in text, path.name
