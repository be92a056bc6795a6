"""Pictures of sparse tensors, point clouds and training curves, drawn headless.

:func:`image`
    A 2-D :class:`~sparsegrid.SparseTensor` (one sample, one channel or the channel norm)
    or a 2-D array as an image; inactive sites in a background colour that no value can
    take.
:func:`points`
    A 3-D (or 2-D) point cloud as a scatter coloured by a scalar, by integer labels (with
    a legend) or by RGB colours; large clouds are subsampled deterministically and the
    title says so.
:func:`voxels`
    The voxel centres of a 3-D SparseTensor, through :func:`points`.
:func:`curve`
    Training curves: one sequence, a dict of sequences, or the per-epoch records of a
    training loop such as ``examples/train_utils.fit``.
:func:`save`
    A figure as a PNG, written atomically.

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path``, also writes
it as a PNG. Figures are built as ``Figure`` objects on their own Agg canvas: pyplot is
never imported, the global backend is never read or changed, no window opens, so the
functions work under any ``MPLBACKEND``, on servers and in threads (each call draws its
own figure). Pass ``ax`` to draw into an axes of a figure of your own (a pyplot one too).

Inputs may be NumPy or CuPy arrays (CuPy ones are copied to the host explicitly) or
autodiff Tensors (their values). Every argument is checked before drawing: a wrong type
is a TypeError, a wrong shape, length or value a ValueError naming the argument.

matplotlib is optional (``pip install sparsegrid[plot]``) and imported on the first call,
not by ``import sparsegrid.plot``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np

from . import backend
from .autodiff.core import data_of
from .coords import check_allocation
from .tensor import SparseTensor

__all__ = ["image", "points", "voxels", "curve", "save"]

#: Keys of per-epoch records that :func:`curve` leaves out unless asked for: bookkeeping
#: on other scales than losses and accuracies (``fit`` logs them). Keys ending in ``_ms``
#: are left out too.
CURVE_SKIPPED_KEYS = ("epoch", "seconds", "lr")

#: Smallest RGB distance (in [0, 1] units) allowed between ``image``'s background and any
#: colour of its colormap, so inactive sites never look like some active value.
MIN_BACKGROUND_DISTANCE = 0.1


# -- matplotlib, lazily -------------------------------------------------------------------
def _matplotlib():
    """The matplotlib pieces used here, imported on first use (never pyplot)."""
    try:
        import matplotlib
        import matplotlib.colors
        import matplotlib.lines
        import matplotlib.ticker
        from matplotlib.axes import Axes
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure, SubFigure
    except ImportError as exc:
        raise ImportError("sparsegrid.plot needs matplotlib: pip install sparsegrid[plot] "
                          "(or pip install matplotlib)") from exc
    return SimpleNamespace(mpl=matplotlib, colors=matplotlib.colors, Axes=Axes,
                           Figure=Figure, SubFigure=SubFigure, Canvas=FigureCanvasAgg,
                           Line2D=matplotlib.lines.Line2D, ticker=matplotlib.ticker)


def _new_axes(m, ax, projection=None, figsize=None):
    """``(root figure, axes)``: a new headless figure, or the caller's ``ax`` checked."""
    if ax is None:
        if figsize is not None:
            figsize = _positive_numbers(figsize, "figsize", 2)
        figure = m.Figure(figsize=figsize)
        m.Canvas(figure)               # its own Agg canvas: no backend, no pyplot
        return figure, figure.add_subplot(projection=projection)
    if not isinstance(ax, m.Axes):
        raise TypeError(f"ax must be a matplotlib Axes; got {type(ax).__name__}")
    if figsize is not None:
        raise ValueError("figsize sets the size of a new figure; it cannot be combined "
                         "with ax")
    want_3d = projection == "3d"
    if want_3d != (ax.name == "3d"):
        raise ValueError(f"ax must be a {'3-D' if want_3d else '2-D'} axes for this "
                         f"picture; got a {ax.name!r} axes"
                         + (" (make one with add_subplot(projection='3d'))" if want_3d
                            else ""))
    return _root_figure(ax), ax


def _root_figure(ax):
    try:
        return ax.get_figure(root=True)
    except TypeError:                  # matplotlib < 3.10: .figure is the root already
        figure = ax.figure
        return getattr(figure, "figure", None) or figure


def _colormap(m, cmap):
    if isinstance(cmap, m.colors.Colormap):
        return cmap
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name or a matplotlib Colormap; got "
                        f"{type(cmap).__name__}")
    try:
        return m.mpl.colormaps[cmap]
    except KeyError:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap name (e.g. "
                         "'viridis', 'magma', 'coolwarm')") from None


def _finish(figure, path):
    if path is not None:
        save(figure, path)
    return figure


# -- argument checks ----------------------------------------------------------------------
def _host(value, name):
    """A NumPy array from a NumPy/CuPy array, an autodiff Tensor or a sequence; CuPy
    arrays are copied to the host explicitly."""
    value = data_of(value)
    if backend.is_cupy_array(value):
        return backend.to_numpy(value)
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}")
    if isinstance(value, np.ma.MaskedArray) and np.ma.getmaskarray(value).any():
        # np.asarray would draw the masked cells with their hidden values
        raise ValueError(f"{name} is a masked array with masked entries, which would be "
                         f"drawn with their hidden values; fill them (.filled(...)) or, "
                         f"for an image with holes, pass a SparseTensor of the active sites")
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from exc


def _real_array(value, name, allow_int=True):
    array = _host(value, name)
    kind = array.dtype.kind
    if kind not in ("f", "i", "u") or (kind in "iu" and not allow_int):
        raise TypeError(f"{name} must be a real {'numeric' if allow_int else 'float'} array; "
                        f"got dtype {array.dtype}")
    return array


def _finite_rows(array, name):
    """ValueError naming the first row of ``array`` (N, ...) holding NaN or inf."""
    if array.size == 0:
        return
    finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} must be finite; {len(bad)} row(s) are not, the first is "
                         f"row {int(bad[0])}: {array[bad[0]]}")


def _integer(value, name, low=None, high=None):
    """An int in ``[low, high)``; bools and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        where = (f"in [{low}, {high - 1}]" if high is not None and low is not None
                 else f">= {low}")
        raise ValueError(f"{name} must be {where}; got {value}")
    return value


def _real(value, name, positive=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'a finite number > 0' if positive else 'finite'}"
                         f"; got {value!r}")
    return value


def _positive_numbers(value, name, n):
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
        raise TypeError(f"{name} must be a sequence of {n} numbers; got {value!r}")
    return tuple(_real(v, f"{name}[{i}]", positive=True) for i, v in enumerate(value))


def _per_axis(value, name, d, positive):
    """One number or ``d`` numbers, finite (and > 0 when ``positive``), as (d,) float64."""
    array = _real_array(value, name)
    if array.ndim > 1 or (array.ndim == 1 and len(array) != d):
        raise ValueError(f"{name} must be one number or {d} numbers; got shape {array.shape}")
    array = np.broadcast_to(array.astype(np.float64), (d,))
    if not np.isfinite(array).all() or (positive and (array <= 0).any()):
        raise ValueError(f"{name} must be {'finite and > 0' if positive else 'finite'}; got "
                         f"{value!r}")
    return array


def _sparse_tensor(x, name, dimension):
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name} must be a SparseTensor; got {type(x).__name__}")
    if x.dimension != dimension:
        raise ValueError(f"{name} must be a {dimension}-D SparseTensor; got "
                         f"{x.dimension}-D with spatial shape {tuple(x.spatial_shape)}")
    return x


def _channel_values(features, channel, name="channel"):
    """(n,) values of one channel of host features (n, C), or their L2 norm over channels
    for ``channel`` "norm" / None; and a label for the colour bar."""
    n_channels = features.shape[1]
    if channel is None or (isinstance(channel, str) and channel == "norm"):
        return np.sqrt((features.astype(np.float64) ** 2).sum(axis=1)), \
            "L2 norm over channels"
    if isinstance(channel, str):
        raise ValueError(f"{name} must be a channel number, 'norm' or None; got {channel!r}")
    channel = _integer(channel, name)
    if not 0 <= channel < n_channels:
        raise ValueError(f"{name} {channel} does not exist: the tensor has {n_channels} "
                         f"channel(s), 0..{n_channels - 1}")
    return features[:, channel].astype(np.float64), f"channel {channel}"


def _batch(x, batch):
    return _integer(batch, "batch", 0, x.batch_size) if x.batch_size else \
        _integer(batch, "batch", 0, 1)


# -- image --------------------------------------------------------------------------------
def image(x, channel=0, batch=0, ax=None, cmap="viridis", title=None, path=None,
          background="white", colorbar=True, figsize=None):
    """A 2-D sparse tensor (one sample) or a 2-D array as an image.

    Coordinate 1 of the tensor runs down the rows, coordinate 2 along the columns (as
    ``x.to_dense()[batch, channel]`` would be shown), one site per image cell, with
    nearest-neighbour drawing. Inactive sites take the ``background`` colour, which must
    differ from every colour of ``cmap`` (at least :data:`MIN_BACKGROUND_DISTANCE` in RGB),
    so an active site whose value is zero never looks inactive. The colour scale spans
    the active values of the sample drawn.

    Parameters
    ----------
    x : SparseTensor (2-D) or array (H, W)
        A sparse tensor (NumPy or CuPy; autodiff features are drawn by value), or a dense
        2-D real array in which every cell is drawn (NaN/inf refused).
    channel : int, "norm" or None
        The feature channel to draw, or ``"norm"`` / ``None`` for the L2 norm over
        channels. A dense array has one channel: 0 (its values) or "norm" (their
        absolute values).
    batch : int
        The sample of a sparse tensor, in ``[0, x.batch_size)``; 0 for a dense array.
    ax : matplotlib Axes (2-D), optional
        Draw there (the returned figure is its figure); by default a new figure.
    cmap : str or Colormap
    title : str, optional
        By default a sparse tensor's picture is titled with the sample number and its
        active and total site counts.
    path : str or PathLike, optional
        Also write the figure there as a PNG (:func:`save`).
    background : matplotlib colour
        The colour of inactive sites; opaque.
    colorbar : bool
        Add a colour bar labelled with the channel.
    figsize : (width, height) in inches, optional
        The size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        ``x`` neither a SparseTensor nor an array; non-real values; a non-int ``channel``
        or ``batch``; a bad ``cmap`` or ``ax`` type.
    ValueError
        A tensor that is not 2-D, an array that is not 2-D, a channel that does not exist,
        a batch out of range, non-finite values, an unknown colormap, a background that is
        not an opaque colour or too close to a colour of the colormap.
    MemoryError
        A picture larger than ``sparsegrid.coords.MAX_ALLOCATION_BYTES``.
    """
    m = _matplotlib()
    colormap = _colormap(m, cmap)
    if not isinstance(colorbar, (bool, np.bool_)):
        raise TypeError(f"colorbar must be True or False; got {colorbar!r}")
    if isinstance(x, SparseTensor):
        x = _sparse_tensor(x, "x", 2)
        batch = _batch(x, batch)
        height, width = (int(s) for s in x.spatial_shape)
        check_allocation("sparsegrid.plot.image", (height, width), 8 + 4,
                         "a picture", "draw a cropped tensor")
        indices = backend.to_numpy(x.indices)
        features = backend.to_numpy(data_of(x.features))
        rows = indices[:, 0] == batch
        values, label = _channel_values(features[rows], channel)
        _finite_rows(values, f"the features drawn ({label}) of sample {batch}")
        picture = np.full((height, width), np.nan)
        picture[indices[rows, 1], indices[rows, 2]] = values
        n_active = int(rows.sum())
        shown = np.ma.masked_invalid(picture)
        if title is None:
            what = background if isinstance(background, str) else "the background colour"
            title = (f"sample {batch}: {n_active:,} active of {height * width:,} sites "
                     f"(inactive: {what})")
        colormap = colormap.with_extremes(bad=_background(m, background, colormap))
    else:
        array = _real_array(x, "x")
        if array.ndim != 2:
            raise ValueError(f"x must be a 2-D SparseTensor or a 2-D array (H, W); got an "
                             f"array of shape {array.shape}")
        if _integer(batch, "batch") != 0:
            raise ValueError(f"batch must be 0 for a dense array (it has one sample); got "
                             f"{batch}")
        if isinstance(channel, str) and channel == "norm" or channel is None:
            values, label = np.abs(array.astype(np.float64)), "absolute value"
        elif isinstance(channel, str):
            raise ValueError(f"channel must be 0, 'norm' or None for a dense array; got "
                             f"{channel!r}")
        elif _integer(channel, "channel") != 0:
            raise ValueError(f"channel {channel} does not exist: a dense 2-D array has one "
                             "channel, 0")
        else:
            values, label = array.astype(np.float64), "value"
        _finite_rows(values, "x")
        _background(m, background, None)    # checked, though every cell is drawn
        shown = values
    figure, ax = _new_axes(m, ax, figsize=figsize)
    active = shown.compressed() if np.ma.isMaskedArray(shown) else shown.ravel()
    low, high = (float(active.min()), float(active.max())) if active.size else (0.0, 1.0)
    drawn = ax.imshow(shown, cmap=colormap, vmin=low, vmax=high, interpolation="nearest",
                      origin="upper")
    ax.set_xlabel("coordinate 2")
    ax.set_ylabel("coordinate 1")
    if title is not None:
        ax.set_title(title)
    if colorbar:
        figure.colorbar(drawn, ax=ax, label=label)
    return _finish(figure, path)


def _background(m, background, colormap):
    """The opaque RGBA of ``background``, refused when ``colormap`` has a colour within
    :data:`MIN_BACKGROUND_DISTANCE` of it."""
    try:
        rgba = m.colors.to_rgba(background)
    except (ValueError, TypeError):
        raise ValueError(f"background must be a matplotlib colour (a name such as 'white' "
                         f"or '#ff00ff', or an RGB tuple); got {background!r}") from None
    if rgba[3] < 1:
        raise ValueError(f"background must be opaque (inactive sites must stay visible); "
                         f"got alpha {rgba[3]:g} from {background!r}")
    if colormap is not None:
        samples = colormap(np.linspace(0.0, 1.0, 256))[:, :3]
        distance = np.sqrt(((samples - np.asarray(rgba[:3])) ** 2).sum(axis=1))
        if distance.min() < MIN_BACKGROUND_DISTANCE:
            at = float(np.linspace(0.0, 1.0, 256)[distance.argmin()])
            raise ValueError(f"background {background!r} is indistinguishable from the "
                             f"colour of colormap {colormap.name!r} at {at:.2f} of its "
                             "range, so inactive sites would look like active values; pass "
                             "another background (e.g. 'white' with 'viridis', 'tab:red' "
                             "with 'gray') or another cmap")
    return rgba


# -- points and voxels --------------------------------------------------------------------
def _label_palette(m):
    """60 distinct categorical colours: tab20 (tab10's colours first), tab20b, tab20c."""
    tab20 = m.mpl.colormaps["tab20"].colors
    palette = list(tab20[0::2]) + list(tab20[1::2])
    palette += list(m.mpl.colormaps["tab20b"].colors) + list(m.mpl.colormaps["tab20c"].colors)
    return np.array([m.colors.to_rgba(c) for c in palette])


def _label_colors(m, labels):
    """``(distinct labels (K,), their RGBA (K, 4), each point's row of them (N,))``.

    Labels 0..59 always get the same colour (palette position = label), so pictures of
    one class set match; otherwise colours follow the rank of the distinct labels
    (sampled from 'turbo' beyond 60 of them)."""
    present, inverse = np.unique(labels, return_inverse=True)
    palette = _label_palette(m)
    if len(present) == 0 or (present[0] >= 0 and present[-1] < len(palette)):
        return present, palette[present], inverse
    if len(present) <= len(palette):
        return present, palette[:len(present)], inverse
    turbo = m.mpl.colormaps["turbo"](np.linspace(0.0, 1.0, len(present)))
    return present, turbo, inverse


def _label_name(label_names, present):
    """Names of the distinct labels ``present`` (their numbers without label_names)."""
    if label_names is None:
        return [str(int(v)) for v in present]
    if isinstance(label_names, Mapping):
        names = {}
        for key, name in label_names.items():
            names[_integer(key, "a key of label_names")] = str(name)
        missing = [int(v) for v in present if int(v) not in names]
    elif isinstance(label_names, Sequence) and not isinstance(label_names, (str, bytes)):
        names = dict(enumerate(str(name) for name in label_names))
        missing = [int(v) for v in present if not 0 <= int(v) < len(label_names)]
    else:
        raise TypeError(f"label_names must be a dict label -> name or a sequence of names "
                        f"(name i for label i); got {type(label_names).__name__}")
    if missing:
        raise ValueError(f"label_names has no name for label(s) {missing[:10]}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return [names[int(v)] for v in present]


def _point_colors(colors, n, depth="auto"):
    """RGB colours (N, 3) uint8 / uint16 / float in [0, 1] as float RGB in [0, 1]."""
    if depth not in ("auto", 8, 16):
        raise ValueError(f"color_depth must be 'auto', 8 or 16; got {depth!r}")
    colors = _host(colors, "colors")
    if colors.shape != (n, 3):
        raise ValueError(f"colors must have shape ({n}, 3) (one RGB row per point); got "
                         f"{colors.shape}")
    if colors.dtype == np.uint8:
        return colors / 255.0
    if colors.dtype == np.uint16:
        # LAS stores 16-bit colour, but many files (Autzen among them) hold 8-bit values
        # in those fields: as CloudCompare does, a uint16 cloud whose values all fit in
        # 0..255 is read as 8-bit, otherwise as 16-bit.
        if depth == "auto":
            depth = 8 if n and int(colors.max()) <= 255 else 16
        if depth == 8 and n and int(colors.max()) > 255:
            raise ValueError(f"color_depth=8, but colors reach {int(colors.max())} (> 255)")
        return colors / (255.0 if depth == 8 else 65535.0)
    if colors.dtype.kind != "f":
        raise TypeError(f"colors must be uint8 (0..255), uint16 (0..65535) or float in "
                        f"[0, 1]; got dtype {colors.dtype} (cast it, e.g. "
                        "colors.astype(np.uint8))")
    _finite_rows(colors, "colors")
    if n and (colors.min() < 0 or colors.max() > 1):
        raise ValueError(f"float colors must lie in [0, 1]; got values in "
                         f"[{colors.min():g}, {colors.max():g}] (uint8 colours: pass them "
                         "as uint8)")
    return colors.astype(np.float64)


def _subsample(n, max_points, seed):
    """Sorted rows of a seeded random subsample of ``max_points`` of ``n``, or None."""
    if max_points is None or n <= max_points:
        return None
    rows = np.random.default_rng(seed).choice(n, size=max_points, replace=False)
    return np.sort(rows)


def _equal_aspect(ticker, ax, xyz):
    """One data unit the same length along every axis, limits hugging the points."""
    d = xyz.shape[1]
    if d == 2:
        ax.set_aspect("equal", adjustable="datalim")
        return
    if len(xyz) == 0:
        low, span = np.zeros(3), np.ones(3)
    else:
        low = xyz.min(axis=0)
        span = xyz.max(axis=0) - low
        largest = float(span.max())
        floor = 0.02 * largest if largest > 0 else 1.0
        low = low - (np.maximum(span, floor) - span) / 2   # flat axes centred
        span = np.maximum(span, floor)
    pad = 0.02 * span
    ax.set_xlim(low[0] - pad[0], low[0] + span[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], low[1] + span[1] + pad[1])
    ax.set_zlim(low[2] - pad[2], low[2] + span[2] + pad[2])
    ax.set_box_aspect(tuple(span + 2 * pad))
    # fewer ticks along short axes, so a flat scene's labels do not pile up
    for axis, length in zip((ax.xaxis, ax.yaxis, ax.zaxis), span / span.max()):
        axis.set_major_locator(ticker.MaxNLocator(nbins=max(1, int(round(6 * length)))))


def points(points, values=None, labels=None, label_names=None, ax=None, title=None,
           path=None, max_points=200_000, elev=30, azim=-60, point_size=None,
           cmap="viridis", colors=None, seed=0, colorbar_label=None, figsize=None,
           color_depth="auto"):
    """A 3-D (or 2-D) point cloud as a scatter plot.

    At most one colouring: ``values`` (a scalar per point, with a colour bar), ``labels``
    (integer classes: categorical colours and a legend) or ``colors`` (RGB per point);
    none draws every point in one colour. The axes have equal scale (one unit is as
    long along every axis) and hug the points.

    Large clouds: with more than ``max_points`` points, a seeded random subsample of
    exactly ``max_points`` rows (``numpy.random.default_rng(seed).choice(n, max_points,
    replace=False)``, drawn in their original order) is shown, and the title says
    "<drawn> of <n> points drawn". The same arguments always draw the same points. The
    colour scale of ``values`` and the legend of ``labels`` come from all the points; a
    label none of whose points was drawn is marked "(none drawn)" in the legend.

    Parameters
    ----------
    points : array (N, 3) or (N, 2)
        Real, finite coordinates (NumPy, CuPy or an autodiff Tensor).
    values : array (N,), optional
        A real, finite scalar per point, coloured with ``cmap``.
    labels : integer array (N,), optional
        A class per point. Labels 0..59 always get the same colours (tab20, tab20b,
        tab20c), so pictures of one class set match; other label sets are coloured by
        the rank of their distinct values.
    label_names : dict label -> name, or sequence (name i for label i), optional
        The legend's entries; by default the label numbers. Every label present needs a
        name.
    ax : matplotlib Axes, optional
        A 3-D axes (``add_subplot(projection='3d')``) for 3-D points, a 2-D one for 2-D
        points; by default a new figure.
    title : str, optional
        By default the number of points; the subsampling note is appended either way.
    path : str or PathLike, optional
        Also write the figure there as a PNG (:func:`save`).
    max_points : int or None
        The most points drawn; None draws them all.
    elev, azim : float
        The 3-D view angles in degrees (ignored for 2-D points).
    point_size : float, optional
        Marker area in points^2; by default it shrinks with the number of points drawn.
    cmap : str or Colormap
        For ``values``.
    colors : array (N, 3), optional
        uint8 (0..255), uint16 (0..65535, as LAS files store them) or float in [0, 1].
    color_depth : 'auto', 8 or 16
        How uint16 ``colors`` are read: 16-bit, or 8-bit values in 16-bit fields (as
        many LAS files hold). ``'auto'`` (default) reads a cloud whose values all fit in
        0..255 as 8-bit (CloudCompare's rule), which misreads a genuinely 16-bit but
        very dark cloud: pass 16 for those.
    seed : int
        The subsample's seed.
    colorbar_label : str, optional
        The label of the ``values`` colour bar.
    figsize : (width, height) in inches, optional
        The size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        Non-real points or values, non-integer labels, colours of another dtype, a bad
        ``label_names``, ``cmap`` or ``ax`` type, non-numbers for the scalar arguments.
    ValueError
        Points not (N, 3) / (N, 2) or not finite; values, labels or colours of another
        length; more than one colouring; ``label_names`` without labels or lacking a
        label; float colours outside [0, 1]; ``max_points`` < 1; an axes of the wrong
        kind.
    """
    m = _matplotlib()
    xyz = _real_array(points, "points")
    if xyz.ndim != 2 or xyz.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 3) or (N, 2); got {xyz.shape}")
    _finite_rows(xyz, "points")
    n, d = xyz.shape
    given = [name for name, v in (("values", values), ("labels", labels), ("colors", colors))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of values, labels and colors; got {given}")
    if label_names is not None and labels is None:
        raise ValueError("label_names names labels: pass labels too")
    colormap = _colormap(m, cmap)
    if max_points is not None:
        max_points = _integer(max_points, "max_points", 1)
    seed = _integer(seed, "seed", 0)
    elev, azim = _real(elev, "elev"), _real(azim, "azim")
    if point_size is not None:
        point_size = _real(point_size, "point_size", positive=True)
    if colorbar_label is not None and values is None:
        raise ValueError("colorbar_label labels the colour bar of values: pass values too")

    if values is not None:
        values = _real_array(values, "values")
        if values.shape != (n,):
            raise ValueError(f"values must have shape ({n},) (one per point); got "
                             f"{values.shape}")
        _finite_rows(values, "values")
        values = values.astype(np.float64)
    legend = None
    if labels is not None:
        labels = _host(labels, "labels")
        if labels.dtype.kind not in ("i", "u"):
            raise TypeError(f"labels must be an integer array; got dtype {labels.dtype}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) (one per point); got "
                             f"{labels.shape}")
        present, present_rgba, label_rows = _label_colors(m, labels)
        legend = (present, present_rgba, _label_name(label_names, present))
        rgba = present_rgba[label_rows]
    if colors is not None:
        rgb = _point_colors(colors, n, color_depth)

    rows = _subsample(n, max_points, seed)
    drawn = xyz if rows is None else xyz[rows]
    n_drawn = len(drawn)
    projection = "3d" if d == 3 else None
    figure, ax = _new_axes(m, ax, projection=projection, figsize=figsize)
    size = point_size if point_size is not None else float(np.clip(4e4 / max(n_drawn, 1),
                                                                     0.1, 30.0))
    style = dict(s=size, linewidths=0, marker="o")
    if d == 3:
        style["depthshade"] = False    # keep each point's exact colour
    if values is not None:
        shown = values if rows is None else values[rows]
        low, high = (float(values.min()), float(values.max())) if n else (0.0, 1.0)
        scatter = ax.scatter(*drawn.T, c=shown, cmap=colormap, vmin=low, vmax=high, **style)
        figure.colorbar(scatter, ax=ax, shrink=0.7 if d == 3 else 1.0,
                        pad=0.15 if d == 3 else 0.05,
                        label=colorbar_label)
    elif labels is not None:
        ax.scatter(*drawn.T, c=rgba if rows is None else rgba[rows], **style)
        present, present_rgba, names = legend
        drawn_counts = np.bincount(label_rows if rows is None else label_rows[rows],
                                   minlength=len(present))
        handles = [m.Line2D([], [], linestyle="", marker="o", markersize=7,
                            markerfacecolor=tuple(c), markeredgewidth=0,
                            label=name + ("" if count else " (none drawn)"))
                   for name, c, count in zip(names, present_rgba, drawn_counts)]
        if handles:
            ax.legend(handles=handles, loc="upper left",   # outside, right of the box
                      bbox_to_anchor=(1.15 if d == 3 else 1.02, 1.0), borderaxespad=0.0, ncol=int(np.ceil(len(handles) / 25)),
                      title="labels" if label_names is None else None)
    elif colors is not None:
        ax.scatter(*drawn.T, c=rgb if rows is None else rgb[rows], **style)
    else:
        ax.scatter(*drawn.T, c="C0", **style)
    _equal_aspect(m.ticker, ax, drawn)
    for axis, name in zip((ax.set_xlabel, ax.set_ylabel, getattr(ax, "set_zlabel", None)),
                          "xyz"[:d]):
        axis(name)
    if d == 3:
        ax.view_init(elev=elev, azim=azim)
    note = (f"{n_drawn:,} of {n:,} points drawn (random subsample, seed {seed})"
            if rows is not None else None)
    if title is None:
        heading = note or f"{n:,} points"
    else:
        heading = title if note is None else f"{title}\n{note}"
    ax.set_title(heading)
    return _finish(figure, path)


def voxels(x, channel=None, labels=None, label_names=None, batch=0, voxel_size=1.0,
           origin=0.0, **kwargs):
    """The active voxels of one sample of a 3-D sparse tensor, as their centres.

    Voxel ``i`` is drawn at ``origin + (i + 0.5) * voxel_size`` (as
    :func:`sparsegrid.io.tensor_to_points` computes it), coloured by one feature channel,
    by the L2 norm over channels (``channel="norm"``) or by per-site labels.

    Parameters
    ----------
    x : SparseTensor (3-D)
    channel : int, "norm" or None
        The feature channel to colour by (with a colour bar); None: not by features.
    labels : integer array (N,), optional
        A class per site, row-aligned with ``x.indices`` (every sample); the rows of
        ``batch`` are drawn.
    label_names : dict or sequence, optional
        As in :func:`points`.
    batch : int
        The sample, in ``[0, x.batch_size)``.
    voxel_size, origin : float or 3 floats
        Grid to real coordinates (as :func:`sparsegrid.pointcloud.voxelize` returns
        them).
    **kwargs
        Passed to :func:`points` (``ax``, ``title``, ``path``, ``max_points``, ``elev``,
        ``azim``, ``point_size``, ``cmap``, ``seed``, ``figsize``, ...); ``colors`` may be
        given per site (N, 3), row-aligned with ``x.indices``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        ``x`` not a SparseTensor, ``points`` / ``values`` among the kwargs, and the
        TypeErrors of :func:`points`.
    ValueError
        A tensor that is not 3-D, a batch out of range, a channel that does not exist,
        both ``channel`` and ``labels``, labels or colours of another length than the
        tensor's rows, and the ValueErrors of :func:`points`.
    """
    from .io import tensor_to_points
    x = _sparse_tensor(x, "x", 3)
    for name in ("points", "values"):
        if name in kwargs:
            raise TypeError(f"voxels draws the tensor's sites; {name} cannot be passed "
                            "(use channel or labels)")
    if channel is not None and labels is not None:
        raise ValueError("pass channel or labels, not both")
    batch = _batch(x, batch)
    size = _per_axis(voxel_size, "voxel_size", 3, positive=True)
    start = _per_axis(origin, "origin", 3, positive=False)
    rows = backend.to_numpy(x.indices[:, 0]) == batch
    n = x.n_active
    centres = backend.to_numpy(tensor_to_points(x, size, start))[rows]
    if channel is not None:
        features = backend.to_numpy(data_of(x.features))[rows]
        values, label = _channel_values(features, channel)
        kwargs["values"] = values
        kwargs.setdefault("colorbar_label", label)
    for name, value, shape in (("labels", labels, (n,)),
                               ("colors", kwargs.get("colors"), (n, 3))):
        if value is not None:
            value = _host(value, name)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape} (one per row of x, every "
                                 f"sample); got {value.shape}")
            kwargs[name] = value[rows]
    if kwargs.get("title") is None:
        kwargs["title"] = f"sample {batch}: {int(rows.sum()):,} active voxels"
    return points(centres, label_names=label_names, **kwargs)


# -- curves -------------------------------------------------------------------------------
def _series(value, name):
    """A 1-D float64 array of a sequence of real numbers (bools refused)."""
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        raise TypeError(f"{name} must be a sequence of numbers; got {type(value).__name__}")
    array = _host(value, name)
    if array.dtype.kind not in ("f", "i", "u"):
        raise TypeError(f"{name} must be a sequence of real numbers; got dtype "
                        f"{array.dtype}")
    if array.ndim == 0:
        raise TypeError(f"{name} must be a sequence of numbers; got the single number "
                        f"{value!r}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {array.shape}")
    if len(array) == 0:
        raise ValueError(f"{name} is empty")
    return array.astype(np.float64)


def _is_number(value):
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))) or \
        (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu")


def _record_series(records, keys, x):
    """``[(key, xs, ys)]`` from per-epoch dicts; x from ``record[x]`` where present,
    else the 1-based record position."""
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"history[{i}] must be a dict like history[0]; got "
                            f"{type(record).__name__}")
    if isinstance(keys, str):
        keys = [keys]
    if keys is None:
        seen = dict.fromkeys(k for record in records for k in record)
        keys = [k for k in seen
                if k != x and k not in CURVE_SKIPPED_KEYS and not str(k).endswith("_ms")
                and all(_is_number(r[k]) for r in records if k in r)]
        if not keys:
            raise ValueError(f"the records have no numeric keys to plot besides "
                             f"{list(CURVE_SKIPPED_KEYS)} and *_ms; pass keys= (they have "
                             f"{list(seen)})")
    else:
        if isinstance(keys, Mapping) or not isinstance(keys, Sequence) or not keys:
            raise TypeError(f"keys must be a key or a non-empty sequence of keys; got "
                            f"{keys!r}")
        for key in keys:
            if not any(key in record for record in records):
                available = list(dict.fromkeys(k for r in records for k in r))
                raise ValueError(f"no record has key {key!r}; the keys are {available}")
    out = []
    for key in keys:
        xs, ys = [], []
        for i, record in enumerate(records):
            if key not in record:
                continue
            if not _is_number(record[key]):
                raise TypeError(f"history[{i}][{key!r}] must be a number; got "
                                f"{type(record[key]).__name__} {record[key]!r}")
            position = record.get(x, i + 1) if x is not None else i + 1
            if not _is_number(position):
                raise TypeError(f"history[{i}][{x!r}] must be a number (the x value); got "
                                f"{position!r}")
            xs.append(float(position))
            ys.append(float(record[key]))
        out.append((str(key), np.array(xs), np.array(ys)))
    return out


def curve(history, path=None, ax=None, title=None, xlabel="epoch", ylabel=None, logy=False,
          keys=None, x="epoch", figsize=None):
    """Training curves: one line per series, against the epoch.

    ``history`` may be

    - a sequence of numbers (one line; x is 1, 2, ...);
    - a dict name -> sequence of numbers (one line each, with a legend);
    - a list of per-epoch dicts, as ``examples/train_utils.fit`` returns (keys ``epoch``,
      ``loss``, ``train_accuracy``, ``test_accuracy``, ``seconds``, ``forward_ms``,
      ``backward_ms``, ``lr``): one line per key in ``keys``, x from each record's ``x``
      key (its 1-based position where absent). A key missing from some records is drawn
      at the records that have it. By default every key with numbers, except
      :data:`CURVE_SKIPPED_KEYS` (the x key, ``seconds``, ``lr``) and ``*_ms``: for
      ``fit``, loss, train_accuracy and test_accuracy.

    NaN or inf values (a diverged loss) are not drawn, and the legend says where they
    are: "loss (not finite at epoch 7, 8)".

    Parameters
    ----------
    history : sequence of numbers, dict of sequences, or list of dicts
    path : str or PathLike, optional
        Also write the figure there as a PNG (:func:`save`).
    ax : matplotlib Axes (2-D), optional
    title, xlabel, ylabel : str, optional
        ``ylabel`` defaults to the name of a single series.
    logy : bool
        A logarithmic y axis; every finite value must then be > 0.
    keys : str or sequence, optional
        For a list of dicts: the keys to draw.
    x : str or None
        For a list of dicts: the key holding the x value (None: the record positions).
    figsize : (width, height) in inches, optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        A history of another kind, non-numeric values, records that are not dicts.
    ValueError
        An empty history or series, series that are not 1-D, ``keys`` no record has,
        non-positive values with ``logy``.

    Examples
    --------
    The records of ``examples/train_utils.fit``, loss on a log scale and the accuracies::

        from sparsegrid import plot
        history = fit(model, optimizer, train_batches, test_batches, epochs=10)
        plot.curve(history, keys="loss", logy=True, path="loss.png")
        plot.curve(history, keys=["train_accuracy", "test_accuracy"],
                   ylabel="accuracy", path="accuracy.png")
        plot.curve({"sgd": sgd_losses, "adam": adam_losses}, ylabel="loss")
    """
    m = _matplotlib()
    if not isinstance(logy, (bool, np.bool_)):
        raise TypeError(f"logy must be True or False; got {logy!r}")
    if keys is not None and not (isinstance(history, Sequence) and history
                                 and isinstance(history[0], Mapping)):
        raise ValueError("keys selects keys of per-epoch records (a list of dicts)")
    if isinstance(history, Mapping):
        if not history:
            raise ValueError("history is empty")
        series = []
        for name, values in history.items():
            ys = _series(values, f"history[{name!r}]")
            series.append((str(name), np.arange(1.0, len(ys) + 1), ys))
    elif isinstance(history, Sequence) and len(history) and isinstance(history[0], Mapping):
        series = _record_series(history, keys, x)
    else:
        ys = _series(history, "history")
        series = [(None, np.arange(1.0, len(ys) + 1), ys)]
    figure, ax = _new_axes(m, ax, figsize=figsize)
    notes = False
    for name, xs, ys in series:
        finite = np.isfinite(ys)
        if logy and (ys[finite] <= 0).any():
            bad = xs[finite][ys[finite] <= 0][0]
            raise ValueError(f"logy needs values > 0; {name or 'history'} is "
                             f"{ys[finite][ys[finite] <= 0][0]:g} at {xlabel or 'x'} "
                             f"{bad:g}")
        label = name
        if not finite.all():
            where = ", ".join(f"{v:g}" for v in xs[~finite][:5])
            more = f" and {int((~finite).sum()) - 5} more" if (~finite).sum() > 5 else ""
            label = f"{name or 'value'} (not finite at {xlabel or 'x'} {where}{more})"
            notes = True
        ax.plot(xs, np.where(finite, ys, np.nan), marker="o" if len(xs) <= 50 else None,
                markersize=3, label=label)
    if logy:
        ax.set_yscale("log")
    all_x = np.concatenate([xs for _, xs, _ in series])
    if np.array_equal(all_x, np.round(all_x)):
        ax.xaxis.set_major_locator(m.ticker.MaxNLocator(integer=True))
    if len(series) > 1 or notes:
        ax.legend()
    if ylabel is None and len(series) == 1:
        ylabel = series[0][0]
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return _finish(figure, path)


# -- files --------------------------------------------------------------------------------
def save(figure, path, dpi=120):
    """Write ``figure`` as a PNG at ``path``, atomically; return ``path``.

    The figure is rendered by Agg whatever its canvas or the global backend (a pyplot
    figure too), cropped to what it draws (``bbox_inches="tight"``), into a hidden
    temporary next to ``path`` that is flushed and renamed over it (as
    :mod:`sparsegrid.io` writes its files), so a reader never sees half a PNG.

    Parameters
    ----------
    figure : matplotlib Figure (or SubFigure: its whole figure is written)
    path : str or PathLike ending in ".png"
    dpi : float > 0

    Returns
    -------
    ``path``, as given.

    Raises
    ------
    TypeError
        ``figure`` not a matplotlib Figure, ``path`` not a path, ``dpi`` not a number.
    ValueError
        A path that does not end in ".png", a non-positive ``dpi``.
    """
    from .io import _atomic_write
    m = _matplotlib()
    if isinstance(figure, m.SubFigure):
        figure = figure.figure
    if not isinstance(figure, m.Figure):
        raise TypeError(f"figure must be a matplotlib Figure; got {type(figure).__name__}")
    try:
        name = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}") \
            from None
    if isinstance(name, bytes) or not name.lower().endswith(".png"):
        raise ValueError(f"path must end in '.png' (save writes PNG files); got {path!r}")
    dpi = _real(dpi, "dpi", positive=True)
    _atomic_write(name, lambda f: figure.savefig(f, format="png", dpi=dpi,
                                                 bbox_inches="tight"))
    return path
