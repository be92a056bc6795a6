"""Progress bars through ``tqdm`` when it is installed, silent when not on a terminal.

:func:`progress` wraps an iterable (or counts by hand through ``update``) exactly as
``tqdm.tqdm`` does. It shows a bar only when ``tqdm`` is importable and the stream (stderr
by default) is a terminal; otherwise -- a log file, a pipe, CI, tqdm not installed -- it is
a do-nothing object with the same methods, so library code and scripts can always call
it. ``enable=True`` or ``False`` overrides the terminal test (``True`` still needs tqdm).

``tqdm`` is optional (``pip install sparsegrid[progress]``) and imported only when a bar is
actually shown.
"""

from __future__ import annotations

import sys

__all__ = ["progress"]


class _Silent:
    """What :func:`progress` returns when no bar is shown: tqdm's methods, doing nothing."""

    disable = True   # as a disabled tqdm bar

    def __init__(self, iterable=None, total=None, initial=0):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)    # as tqdm does
        self.total = total
        self.n = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def __len__(self):
        if self.total is not None:
            return int(self.total)
        return len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, desc=None, refresh=True):
        pass

    def set_description_str(self, desc=None, refresh=True):
        pass

    def refresh(self, nolock=False, lock_args=None):
        pass

    def clear(self, nolock=False):
        pass

    def reset(self, total=None):
        self.n = 0
        if total is not None:
            self.total = total

    def write(self, s, file=None, end="\n", nolock=False):
        # tqdm.write prints to stdout unless told otherwise; so does the stand-in
        print(s, file=sys.stdout if file is None else file, end=end)

    def close(self):
        pass


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):   # a closed stream
        return False


def progress(iterable=None, total=None, desc=None, unit="it", enable=None, file=None,
             leave=False, **kwargs):
    """A ``tqdm`` bar over ``iterable`` (or a manual counter), or a silent stand-in.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over; ``None`` for a counter advanced with ``update(n)``.
    total : int, optional
        The expected number of steps (``len(iterable)`` when omitted and available).
    desc, unit : str
        The bar's label and unit, as in tqdm.
    enable : bool or None
        ``None`` (default): show a bar when tqdm is installed and ``file`` is a terminal.
        ``False``: never. ``True``: whenever tqdm is installed, terminal or not.
    file : file-like, optional
        Where the bar is drawn; stderr by default.
    leave : bool
        Keep the finished bar on screen (tqdm's ``leave``); default False.
    **kwargs
        Passed to ``tqdm.tqdm``.

    Returns
    -------
    tqdm.tqdm or a silent object with the same methods (``update``, ``set_postfix``,
    ``set_postfix_str``, ``set_description``, ``set_description_str``, ``refresh``,
    ``clear``, ``reset``, ``write`` (to stdout unless ``file`` is given, as tqdm's),
    ``close``, context manager, iteration) and attributes (``n``, ``total``, ``disable``).
    """
    stream = sys.stderr if file is None else file
    show = _is_terminal(stream) if enable is None else bool(enable)
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            show = False
    if not show:
        return _Silent(iterable, total, kwargs.get("initial", 0))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave,
                **kwargs)
