"""Deterministic synthetic 3-D scenes for benchmarking sparse convolution.

Every scene function returns ``(indices, spatial_shape)``:

* ``indices`` -- int32 array of shape ``(N, 4)``; column 0 is the batch
  index (0 except in ``lidar_batch``), columns 1..3 are the voxel coordinates
  ``(x, y, z)`` with ``0 <= indices[:, 1 + d] < spatial_shape[d]``.  Rows
  are unique and sorted lexicographically.
* ``spatial_shape`` -- tuple of 3 Python ints.

The scenes are built to resemble the two workloads sparse convolution is
usually benchmarked on:

* an outdoor spinning-LiDAR sweep (``lidar_street``): few points per voxel,
  scan-line structure, thin and sparse far away;
* an indoor RGB-D style reconstruction (``furnished_room``): densely sampled
  surfaces, close to a 2-D manifold in 3-D.

For scaling measurements, ``lidar_batch(n_voxels)`` stacks LiDAR sweeps along
the batch axis up to any size (``SCALED_SCENES``: about 1M and 4M voxels);
those are not part of ``SCENES``.

Everything is pure, vectorised NumPy and seeded, so the same call always
returns the same voxels.  Run ``python benchmarks/scenes.py [NAME ...]`` to
print the statistics of each scene (default: those of ``SCENES``; e.g.
``python benchmarks/scenes.py scaled_1m scaled_4m``).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = [
    "SCALED_SCENES",
    "SCENES",
    "furnished_room",
    "lidar_batch",
    "lidar_street",
    "mean_neighbours",
    "voxelise",
]


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def voxelise(points, lower, upper, voxel_size):
    """Quantise points to unique, sorted voxel indices.

    Parameters
    ----------
    points : ndarray, shape (M, 3)
        Point coordinates in metres.
    lower, upper : sequence of 3 floats
        Axis-aligned bounds of the voxel grid in metres; points outside
        ``[lower, upper)`` are dropped.
    voxel_size : float
        Edge length of a voxel in metres.

    Returns
    -------
    indices : ndarray of int32, shape (N, 4)
        ``(0, x, y, z)`` rows, unique and lexicographically sorted.
    spatial_shape : tuple of 3 int
        Number of voxels along each axis.
    """
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    # round() guards against 140.8 / 0.05 = 2815.9999... style truncation.
    shape = np.round((upper - lower) / voxel_size).astype(np.int64)
    coords = np.floor((points - lower) / voxel_size).astype(np.int64)
    inside = np.all((coords >= 0) & (coords < shape), axis=1)
    coords = coords[inside]
    # A linear key with the last axis fastest sorts exactly like the
    # lexicographic (x, y, z) order, and np.unique on 1-D int64 is much
    # faster than np.unique(axis=0).
    keys = np.unique((coords[:, 0] * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2])
    indices = np.zeros((keys.size, 4), dtype=np.int32)
    indices[:, 3] = keys % shape[2]
    keys //= shape[2]
    indices[:, 2] = keys % shape[1]
    indices[:, 1] = keys // shape[1]
    return indices, tuple(int(s) for s in shape)


def mean_neighbours(indices):
    """Mean number of active sites in the 3x3x3 box around each active site.

    The site itself is counted, so an isolated voxel contributes 1 and a
    voxel in the interior of a fully occupied region contributes 27.

    Parameters
    ----------
    indices : ndarray of int, shape (N, 4)
        ``(batch, x, y, z)`` rows, unique.

    Returns
    -------
    float
        Average neighbour count (0.0 for an empty input).
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.shape[0] == 0:
        return 0.0
    # Shift by one and size the key space two wider per axis so that the
    # neighbours of border voxels (coordinate -1 or shape) get keys of their
    # own instead of aliasing onto a voxel of the next row.
    coords = idx[:, 1:] + 1
    dims = coords.max(axis=0) + 2
    batch = idx[:, 0]

    def key(c):
        return ((batch * dims[0] + c[:, 0]) * dims[1] + c[:, 1]) * dims[2] + c[:, 2]

    keys = np.sort(key(coords))
    total = 0
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                probe = key(coords + np.array([dx, dy, dz]))
                pos = np.searchsorted(keys, probe)
                pos[pos == keys.size] = 0  # any index; compared below
                total += int(np.count_nonzero(keys[pos] == probe))
    return total / idx.shape[0]


# --------------------------------------------------------------------------
# LiDAR street scene
# --------------------------------------------------------------------------

# Grid bounds of the street scene in metres (sensor at x = y = 0).  They are
# multiples of 0.1 m so that 5 cm and 10 cm grids line up.
STREET_LOWER = (-70.4, -40.0, -2.0)
STREET_UPPER = (70.4, 40.0, 22.0)

SENSOR_HEIGHT = 1.8  # metres above the ground plane, as on a car roof
MAX_RANGE = 70.0  # metres; returns further away are dropped
RANGE_NOISE = 0.02  # metres, 1 sigma; typical of a 64-beam spinning sensor


def lidar_rays(n_azimuth=1800, fov_down=-25.0, fov_split=-8.5, fov_up=3.0, beams_per_block=32):
    """Unit ray directions of one revolution of a spinning 64-beam LiDAR.

    Like the Velodyne HDL-64E, the lasers come in two blocks: the upper one
    (``fov_split`` .. ``fov_up``) is packed more tightly than the lower one
    (``fov_down`` .. ``fov_split``), which puts more returns at long range
    and fewer on the ground next to the car.

    Parameters
    ----------
    n_azimuth : int
        Firings per laser per revolution.
    fov_down, fov_split, fov_up : float
        Elevations in degrees: lowest laser, boundary between the two
        blocks, highest laser.
    beams_per_block : int
        Lasers in each block.

    Returns
    -------
    ndarray, shape (2 * beams_per_block * n_azimuth, 3)
        Unit direction vectors.
    """
    elevation = np.deg2rad(
        np.concatenate(
            [
                np.linspace(fov_down, fov_split, beams_per_block, endpoint=False),
                np.linspace(fov_split, fov_up, beams_per_block),
            ]
        )
    )
    azimuth = np.linspace(0.0, 2.0 * np.pi, n_azimuth, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    el, az = el.ravel(), az.ravel()
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=1)


def ray_plane_z(origin, dirs, z):
    """Distance along each ray to the horizontal plane at height ``z``.

    Rays that point away from (or parallel to) the plane get ``inf``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - origin[2]) / dirs[:, 2]
    return np.where(t > 0, t, np.inf)


def ray_box(origin, dirs, box_min, box_max):
    """Distance along each ray to an axis-aligned box (slab method).

    Parameters
    ----------
    origin : ndarray, shape (3,)
        Common origin of all rays (outside the box).
    dirs : ndarray, shape (R, 3)
        Ray directions.
    box_min, box_max : sequence of 3 floats
        Opposite corners of the box.

    Returns
    -------
    ndarray, shape (R,)
        Entry distance, ``inf`` where the ray misses.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        # A zero direction component gives +-inf, which is exactly what the
        # slab test needs (the ray is either always or never inside that
        # slab); the origin is never exactly on a face, so no 0/0.
        t1 = (np.asarray(box_min) - origin) / dirs
        t2 = (np.asarray(box_max) - origin) / dirs
    t_near = np.minimum(t1, t2).max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    hit = (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def ray_vertical_cylinder(origin, dirs, centre_xy, radius, z_min, z_max):
    """Distance along each ray to the side of a vertical cylinder.

    The caps are ignored: the cylinders used here (poles, trunks) are thin,
    so their caps would catch almost no rays.

    Returns
    -------
    ndarray, shape (R,)
        Entry distance, ``inf`` where the ray misses.
    """
    ox = origin[0] - centre_xy[0]
    oy = origin[1] - centre_xy[1]
    a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
    b = 2.0 * (dirs[:, 0] * ox + dirs[:, 1] * oy)
    c = ox * ox + oy * oy - radius * radius
    disc = b * b - 4.0 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2.0 * a)  # nearer root: entry point
    z = origin[2] + t * dirs[:, 2]
    hit = (disc >= 0) & (a > 0) & (t > 0) & (z >= z_min) & (z <= z_max)
    return np.where(hit, t, np.inf)


def ray_sphere(origin, dirs, centre, radius):
    """Distance along each (unit) ray to a sphere, ``inf`` where it misses."""
    oc = origin - np.asarray(centre)
    b = dirs @ oc
    c = oc @ oc - radius * radius
    disc = b * b - c
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def street_layout(rng):
    """Random but seeded street furniture along a road on the x axis.

    Parameters
    ----------
    rng : numpy.random.Generator

    Returns
    -------
    dict
        ``"boxes"``: list of ``(min, max)`` corners (buildings and cars);
        ``"cylinders"``: list of ``(centre_xy, radius, z_min, z_max)``
        (poles and tree trunks); ``"spheres"``: list of ``(centre, radius)``
        (tree crowns).
    """
    boxes, cylinders, spheres = [], [], []

    # Two rows of building facades, one per side of the road, with gaps
    # (side streets, driveways) that let rays through to the far range.
    for side in (-1.0, 1.0):
        x = -80.0
        while x < 80.0:
            width = rng.uniform(8.0, 25.0)
            front = rng.uniform(10.0, 13.0)  # set-back varies per building
            depth = rng.uniform(8.0, 15.0)
            height = rng.uniform(6.0, 20.0)
            y0, y1 = sorted((side * front, side * (front + depth)))
            boxes.append(((x, y0, 0.0), (x + width, y1, height)))
            x += width + rng.uniform(2.0, 8.0)

    # Cars: mostly parked along the kerbs, a few in the traffic lanes.  Each
    # car is a body box plus a narrower, shorter cabin box on top.
    lanes = (-5.5, -1.8, 1.8, 5.5)
    lane_weights = (0.35, 0.15, 0.15, 0.35)
    for _ in range(14):
        cx = rng.uniform(-45.0, 45.0)
        cy = rng.choice(lanes, p=lane_weights) + rng.uniform(-0.2, 0.2)
        if abs(cx) < 4.0 and abs(cy) < 3.0:
            continue  # that is where the sensor car stands
        length, width = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9)
        boxes.append(((cx - length / 2, cy - width / 2, 0.2), (cx + length / 2, cy + width / 2, 0.95)))
        boxes.append(((cx - length / 4, cy - width / 2 + 0.1, 0.95), (cx + length / 4, cy + width / 2 - 0.1, 1.5)))

    # Street-light poles on both pavements.
    for side in (-1.0, 1.0):
        for x in np.arange(-60.0, 61.0, 20.0) + rng.uniform(-2.0, 2.0):
            cylinders.append(((x, side * 8.0), 0.12, 0.0, 7.0))

    # Trees between the poles: trunk cylinder plus spherical crown.
    for side in (-1.0, 1.0):
        for x in np.arange(-50.0, 51.0, 20.0) + rng.uniform(-3.0, 3.0):
            y = side * rng.uniform(8.0, 9.0)
            crown = rng.uniform(1.5, 2.5)
            trunk_top = rng.uniform(2.5, 3.5)
            cylinders.append(((x, y), rng.uniform(0.15, 0.3), 0.0, trunk_top))
            spheres.append(((x, y, trunk_top + 0.7 * crown), crown))

    return {"boxes": boxes, "cylinders": cylinders, "spheres": spheres}


def raycast(origin, dirs, layout):
    """Nearest hit distance of every ray against the ground and the layout.

    Returns
    -------
    ndarray, shape (R,)
        Distance to the nearest surface, ``inf`` where nothing is hit.
    """
    t = ray_plane_z(origin, dirs, 0.0)
    for box_min, box_max in layout["boxes"]:
        np.minimum(t, ray_box(origin, dirs, box_min, box_max), out=t)
    for centre_xy, radius, z_min, z_max in layout["cylinders"]:
        np.minimum(t, ray_vertical_cylinder(origin, dirs, centre_xy, radius, z_min, z_max), out=t)
    for centre, radius in layout["spheres"]:
        np.minimum(t, ray_sphere(origin, dirs, centre, radius), out=t)
    return t


def lidar_street(voxel_size=0.05, seed=0):
    """One revolution of a 64-beam LiDAR in a street, voxelised.

    A sensor 1.8 m above the ground with 64 beams between -25 and +3 degrees
    elevation and 1800 firings per revolution is ray-cast analytically
    against a ground plane, two rows of building facades, parked and moving
    cars, street-light poles and trees.  Returns up to ``MAX_RANGE`` get
    Gaussian range noise, then the hit points are voxelised.

    Parameters
    ----------
    voxel_size : float
        Voxel edge in metres.  The grid covers x in [-70.4, 70.4),
        y in [-40, 40), z in [-2, 22) metres, sensor at (0, 0, 1.8).
    seed : int
        Seed for the layout and the range noise.

    Returns
    -------
    indices : ndarray of int32, shape (N, 4)
    spatial_shape : tuple of 3 int
    """
    rng = np.random.default_rng(seed)
    layout = street_layout(rng)
    origin = np.array([0.0, 0.0, SENSOR_HEIGHT])
    dirs = lidar_rays()
    t = raycast(origin, dirs, layout)
    keep = t <= MAX_RANGE
    t = t[keep] + rng.normal(0.0, RANGE_NOISE, size=int(keep.sum()))
    points = origin + t[:, None] * dirs[keep]
    return voxelise(points, STREET_LOWER, STREET_UPPER, voxel_size)


# --------------------------------------------------------------------------
# Furnished room scene
# --------------------------------------------------------------------------

ROOM_SIZE = (5.0, 4.0, 2.5)  # metres: x, y, z (height)
ROOM_MARGIN = 0.11  # metres of empty grid around the room; 0.11 (not 0.1) puts the walls and floor mid-voxel, so the noise does not split them into two layers
POINTS_PER_M2 = 7_000  # ~3 samples per 2 cm voxel face: a few per cent of surface voxels stay empty, like the holes of a real scan
SURFACE_NOISE = 0.003  # metres, 1 sigma; depth-sensor style jitter


def box_faces(size, skip_bottom=True):
    """Rectangular faces of a box with one corner at the origin.

    Parameters
    ----------
    size : sequence of 3 floats
        Box extent along x, y, z.
    skip_bottom : bool
        Leave out the face at z = 0 (it rests on the floor and is unseen).

    Returns
    -------
    list of (origin, u, v)
        Each face is ``origin + a * u + b * v`` for ``a, b`` in [0, 1].
    """
    sx, sy, sz = size
    ex, ey, ez = np.array([sx, 0, 0.0]), np.array([0, sy, 0.0]), np.array([0, 0, sz])
    zero = np.zeros(3)
    faces = [
        (zero + ez, ex, ey),  # top
        (zero, ex, ez),  # front (y = 0)
        (zero + ey, ex, ez),  # back
        (zero, ey, ez),  # left (x = 0)
        (zero + ex, ey, ez),  # right
    ]
    if not skip_bottom:
        faces.append((zero, ex, ey))
    return faces


def sample_faces(faces, rng, density):
    """Uniform random points on parallelogram faces, area-proportional.

    Parameters
    ----------
    faces : list of (origin, u, v)
    rng : numpy.random.Generator
    density : float
        Expected number of points per square metre.

    Returns
    -------
    ndarray, shape (M, 3)
    """
    chunks = []
    for origin, u, v in faces:
        area = np.linalg.norm(np.cross(u, v))
        n = rng.poisson(density * area)
        ab = rng.random((n, 2))
        chunks.append(origin + ab[:, :1] * u + ab[:, 1:] * v)
    return np.concatenate(chunks) if chunks else np.empty((0, 3))


def place(points, position, yaw):
    """Rotate points about the vertical axis by ``yaw`` radians, then shift."""
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return points @ rot.T + np.asarray(position)


def furniture(rng):
    """Seeded list of furniture pieces, each a list of boxes.

    Returns
    -------
    list of (position, yaw, boxes)
        ``boxes`` are ``(offset, size)`` in the piece's own frame; the piece
        is rotated by ``yaw`` about its local origin and moved to
        ``position``.  Some pieces are rotated off-axis on purpose: slanted
        surfaces voxelise thicker than axis-aligned ones, as in real scans.
    """
    def table(w, d, h):
        legs = [((x, y, 0.0), (0.05, 0.05, h - 0.04)) for x in (0.0, w - 0.05) for y in (0.0, d - 0.05)]
        return legs + [((0.0, 0.0, h - 0.04), (w, d, 0.04))]

    def chair():
        legs = [((x, y, 0.0), (0.04, 0.04, 0.45)) for x in (0.0, 0.41) for y in (0.0, 0.41)]
        return legs + [((0.0, 0.0, 0.45), (0.45, 0.45, 0.04)), ((0.0, 0.41, 0.49), (0.45, 0.04, 0.45))]

    def sofa():
        return [
            ((0.0, 0.0, 0.0), (2.0, 0.9, 0.42)),  # seat block
            ((0.0, 0.7, 0.42), (2.0, 0.2, 0.45)),  # backrest
            ((0.0, 0.0, 0.42), (0.2, 0.7, 0.2)),  # arm rests
            ((1.8, 0.0, 0.42), (0.2, 0.7, 0.2)),
        ]

    def shelf(w, d, h, n_boards):
        sides = [((0.0, 0.0, 0.0), (0.02, d, h)), ((w - 0.02, 0.0, 0.0), (0.02, d, h))]
        back = [((0.0, d - 0.01, 0.0), (w, 0.01, h))]
        boards = [((0.02, 0.0, z), (w - 0.04, d, 0.02)) for z in np.linspace(0.05, h - 0.02, n_boards)]
        return sides + back + boards

    pieces = [
        ((0.3, 3.05, 0.0), 0.0, sofa()),  # sofa against the back wall
        ((1.2, 2.3, 0.0), -0.3, table(0.6, 0.6, 0.45)),  # coffee table
        ((0.8, 0.6, 0.0), 0.1, table(1.4, 0.8, 0.75)),  # dining table
        ((3.5, 0.05, 0.0), 0.0, table(1.4, 0.7, 0.74)),  # desk
        ((4.95, 1.6, 0.0), np.pi / 2, shelf(1.0, 0.35, 2.0, 5)),  # shelves on the right wall
        ((4.95, 2.9, 0.0), np.pi / 2, shelf(0.8, 0.35, 1.2, 3)),
    ]
    # Chairs around the dining table, each slightly askew.  A chair's back
    # is at its local +y, so the ones in front of the table are turned by pi
    # (their position is then the far corner).
    for x, y, yaw in [(1.4, 0.55, np.pi), (2.1, 0.55, np.pi), (0.9, 1.5, 0.0), (1.6, 1.5, 0.0)]:
        pieces.append(((x, y, 0.0), yaw + rng.uniform(-0.2, 0.2), chair()))
    pieces.append(((4.4, 1.3, 0.0), np.pi + rng.uniform(-0.3, 0.3), chair()))  # desk chair
    return pieces


def furnished_room(voxel_size=0.02, seed=0):
    """Densely sampled surfaces of a furnished room, voxelised.

    A 6 m x 5 m x 2.6 m room (floor and four walls, no ceiling, as in a scan
    from above) holds a dining table with chairs, a desk, a sofa, shelves and
    a coffee table, all made of boxes.  Every surface is sampled uniformly at
    random (area-proportional, seeded), jittered by a few millimetres of
    noise and voxelised.

    Parameters
    ----------
    voxel_size : float
        Voxel edge in metres.  The grid covers the room plus 10 cm on every
        side.
    seed : int
        Seed for the sampling, the noise and small furniture perturbations.

    Returns
    -------
    indices : ndarray of int32, shape (N, 4)
    spatial_shape : tuple of 3 int
    """
    rng = np.random.default_rng(seed)
    size = np.array(ROOM_SIZE)
    # The room shell: a box seen from inside, open at the top.
    shell = box_faces(size, skip_bottom=False)[1:]  # drop the ceiling
    parts = [sample_faces(shell, rng, POINTS_PER_M2)]
    for position, yaw, boxes in furniture(rng):
        faces = []
        for offset, box_size in boxes:
            faces += [(np.asarray(offset) + o, u, v) for o, u, v in box_faces(box_size)]
        parts.append(place(sample_faces(faces, rng, POINTS_PER_M2), position, yaw))
    points = np.concatenate(parts)
    points += rng.normal(0.0, SURFACE_NOISE, size=points.shape)
    lower = -np.full(3, ROOM_MARGIN)
    upper = size + ROOM_MARGIN
    return voxelise(points, lower, upper, voxel_size)


# --------------------------------------------------------------------------
# Registry and command line
# --------------------------------------------------------------------------

SCENES = {
    "lidar_5cm": lambda: lidar_street(voxel_size=0.05),
    "lidar_10cm": lambda: lidar_street(voxel_size=0.10),
    "room_2cm": lambda: furnished_room(voxel_size=0.02),
}


# --------------------------------------------------------------------------
# Scaled scene: a batch of LiDAR sweeps of any size
# --------------------------------------------------------------------------

_BASE_SWEEPS = {}


def _base_sweep(seed):
    """lidar_street(0.05, seed), computed once per process (about 1 s each)."""
    if seed not in _BASE_SWEEPS:
        indices, shape = lidar_street(voxel_size=0.05, seed=seed)
        indices.flags.writeable = False
        _BASE_SWEEPS[seed] = (indices, shape)
    return _BASE_SWEEPS[seed]


def lidar_batch(n_voxels, seeds=(0, 4)):
    """A batch of LiDAR sweeps with exactly ``n_voxels`` voxels in total.

    Sample ``b`` of the batch is the sweep of :func:`lidar_street` (5 cm voxels) with
    street layout ``seeds[b % len(seeds)]``, mirrored in x and / or y
    (``(b // len(seeds)) % 4`` picks one of the four mirror images), so that the first
    ``4 * len(seeds)`` samples all differ. Every sample is a complete sweep with the
    local statistics of a LiDAR frame, as a training batch of frames is; the last sample
    is cut (a slab of x) to hit ``n_voxels`` exactly. The default layouts 0 and 4 have
    mean 3x3x3 neighbour counts 5.1 and 5.4 (layouts 0-5 range over 4.6-5.4), so the
    batch has about 5.2, like ``lidar_5cm``. Only ``len(seeds)`` sweeps are ray-cast
    (about 1 s each, cached per process); the rest is copying, so 4M voxels take a few
    seconds and about 200 MB of temporaries.

    Parameters
    ----------
    n_voxels : int
        Total number of voxels (rows).
    seeds : sequence of int
        Street layout seeds of the distinct sweeps.

    Returns
    -------
    indices : ndarray of int32, shape (n_voxels, 4)
        ``(batch, x, y, z)`` rows, unique and sorted lexicographically (batch first).
    spatial_shape : tuple of 3 int
        That of ``lidar_5cm``: (2816, 1600, 480).
    """
    sweeps = [_base_sweep(int(seed)) for seed in seeds]
    return _mirrored_batch([indices for indices, _ in sweeps], sweeps[0][1], int(n_voxels))


def _mirrored_batch(bases, shape, n_voxels):
    """``n_voxels`` rows: sample ``b`` is ``bases[b % len(bases)]`` mirrored in x and / or
    y by ``(b // len(bases)) % 4``, re-sorted by (x, y, z), with batch index b; the last
    sample is cut to fit (lidar_batch, room_batch)."""
    out = np.empty((n_voxels, 4), dtype=np.int32)
    filled, b = 0, 0
    while filled < n_voxels:
        sample = bases[b % len(bases)].copy()
        flip = (b // len(bases)) % 4
        if flip & 1:
            sample[:, 1] = shape[0] - 1 - sample[:, 1]
        if flip & 2:
            sample[:, 2] = shape[1] - 1 - sample[:, 2]
        if flip:
            # restore the (x, y, z) order; keys fit int64 easily
            key = (sample[:, 1].astype(np.int64) * shape[1] + sample[:, 2]) * shape[2] + sample[:, 3]
            sample = sample[np.argsort(key, kind="stable")]
        sample[:, 0] = b
        take = min(len(sample), n_voxels - filled)
        out[filled:filled + take] = sample[:take]
        filled += take
        b += 1
    return out, shape

SCALED_SCENES = {
    "scaled_1m": lambda: lidar_batch(1_000_000),
    "scaled_4m": lambda: lidar_batch(4_000_000),
}


def scene(name):
    """``SCENES[name]()`` or ``SCALED_SCENES[name]()``; also ``scaled_<N>`` for any N
    (``scaled_250000``, ``scaled_2m``)."""
    if name in SCENES:
        return SCENES[name]()
    if name in SCALED_SCENES:
        return SCALED_SCENES[name]()
    if name.startswith("scaled_"):
        size = name[len("scaled_"):].lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(size[-1:], 1)
        return lidar_batch(int(float(size.rstrip("km")) * scale))
    raise KeyError(f"unknown scene {name!r}; known: {sorted(SCENES) + sorted(SCALED_SCENES)}")


def main(argv=None):
    """Print size, grid shape, mean neighbours and build time of each scene."""
    import sys

    names = (sys.argv[1:] if argv is None else argv) or list(SCENES)
    print(f"{'scene':<12} {'N':>9} {'spatial_shape':>20} {'mean nbrs':>10} {'gen time':>9}")
    for name in names:
        make = lambda: scene(name)  # noqa: E731
        start = time.perf_counter()
        indices, shape = make()
        elapsed = time.perf_counter() - start
        print(f"{name:<12} {indices.shape[0]:>9,} {str(shape):>20} {mean_neighbours(indices):>10.2f} {elapsed:>8.2f}s")


# --------------------------------------------------------------------------
# Indoor batches, small sweeps and the GPU benchmarks' scene names
# --------------------------------------------------------------------------

_BASE_ROOMS = {}


def _base_room(seed):
    """furnished_room(0.02, seed), computed once per process (about 0.5 s each)."""
    if seed not in _BASE_ROOMS:
        indices, shape = furnished_room(voxel_size=0.02, seed=seed)
        indices.flags.writeable = False
        _BASE_ROOMS[seed] = (indices, shape)
    return _BASE_ROOMS[seed]


def room_batch(n_voxels, seeds=(0, 1)):
    """A batch of furnished rooms (2 cm voxels) with exactly ``n_voxels`` voxels in total.

    The indoor counterpart of :func:`lidar_batch`: sample ``b`` is
    :func:`furnished_room` with seed ``seeds[b % len(seeds)]`` (another random sampling
    of the same furniture, chairs turned differently), mirrored in x and / or y
    (``(b // len(seeds)) % 4`` picks one of the four mirror images); the last sample is
    cut (a slab of x) to hit ``n_voxels`` exactly. Each room has about 234,000 voxels and
    a mean 3x3x3 neighbour count of about 10.4 (a densely scanned surface), so 1M voxels
    are a batch of five rooms, as an indoor segmentation batch is.

    Parameters
    ----------
    n_voxels : int
        Total number of voxels (rows), at least 1.
    seeds : sequence of int
        Seeds of the distinct rooms.

    Returns
    -------
    indices : ndarray of int32, shape (n_voxels, 4)
        ``(batch, x, y, z)`` rows, unique and sorted lexicographically (batch first).
    spatial_shape : tuple of 3 int
        That of ``room_2cm``.
    """
    n_voxels = int(n_voxels)
    if n_voxels < 1:
        raise ValueError(f"room_batch: n_voxels must be a positive int; got {n_voxels}")
    rooms = [_base_room(int(seed)) for seed in seeds]
    return _mirrored_batch([indices for indices, _ in rooms], rooms[0][1], n_voxels)


def small_lidar_sweep(voxel_size=0.2, n_azimuth=360, seed=0):
    """A coarse, cheap LiDAR sweep (the benchmarks' ``--smoke`` scenes).

    :func:`lidar_street` with ``n_azimuth`` firings per laser instead of 1800 (about
    0.2 s instead of 1 s of ray casting) and coarse voxels: a few thousand voxels with
    the street's structure.

    Returns
    -------
    indices : ndarray of int32, shape (N, 4)
    spatial_shape : tuple of 3 int
    """
    rng = np.random.default_rng(seed)
    layout = street_layout(rng)
    origin = np.array([0.0, 0.0, SENSOR_HEIGHT])
    dirs = lidar_rays(n_azimuth=n_azimuth)
    t = raycast(origin, dirs, layout)
    keep = t <= MAX_RANGE
    t = t[keep] + rng.normal(0.0, RANGE_NOISE, size=int(keep.sum()))
    points = origin + t[:, None] * dirs[keep]
    return voxelise(points, STREET_LOWER, STREET_UPPER, voxel_size)


# The GPU benchmarks' names (benchmarks/bench_conv_cuda.py, bench_network.py): 1M-voxel
# indoor and LiDAR batches, the networks' 120k / 900k inputs, and tiny --smoke scenes.
SCALED_SCENES.update({
    "lidar_1m": lambda: lidar_batch(1_000_000),
    "room_1m": lambda: room_batch(1_000_000),
    "lidar_120k": lambda: lidar_batch(120_000),
    "lidar_900k": lambda: lidar_batch(900_000),
    "room_120k": lambda: room_batch(120_000),
    "room_900k": lambda: room_batch(900_000),
    "smoke_lidar": lambda: small_lidar_sweep(0.4, 360),
    "smoke_room": lambda: furnished_room(voxel_size=0.2),
})
__all__ += ["room_batch", "small_lidar_sweep"]


if __name__ == "__main__":
    main()
