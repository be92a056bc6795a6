"""Pieces of atomic file replacement shared by checkpoints and the file formats."""

from __future__ import annotations

import os


def destination_folder(path):
    """The folder a file ``path`` is written into, after checking that ``path`` names a
    file in an existing folder: IsADirectoryError / FileNotFoundError naming ``path``
    (not the temporary a writer would otherwise fail on)."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: its folder {folder!r} does not "
                                "exist")
    return folder


def umask():
    """The process's file-creation mask, read without changing it (Linux; 0o022 else)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def replace_keeping_mode(tmp, path):
    """Rename the finished temporary ``tmp`` over ``path``, with ``path``'s permissions
    when it exists (else the default ones a new file gets)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~umask()
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def fsync_folder(folder):
    """Make a rename in ``folder`` durable (POSIX); harmless to skip where unsupported."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
