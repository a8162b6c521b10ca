"""Where a support volume's annotated structure lies in another patient's query volume: the query
slices worth segmenting, and for each of them the position among the support's slices that its
nearest support slices are chosen by.

Two rules:

- ``relative``: the annotated z-range's relative position in the support volume, carried to the
  same relative position in the query. It assumes both scans cover the same body region.
- ``registration``: a 3-D registration of the support volume onto the query (an exhaustive
  z-translation search, then a similarity transform; Mattes mutual information, so CT and MRI
  mix), and the support's annotated world range carried through it. It holds when the two fields
  of view differ (a cropped end, a scan extended beyond the organs).

A registration is trusted only when it converged to a better fit than its start, the two volumes
then share at least ``MIN_MUTUAL_INFORMATION``, its scale stays within [0.5, 2], and the
structure lands inside the query; an untrusted one falls back to every query slice (the rule
says why).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from nibabel import orientations

from sdfsmis.config import InferenceConfig
from sdfsmis.io.volume import Intensity, Volume, _to_ras, ras_spacing

#: Grid the registration runs on (mm): coarse enough for a second on CPU, fine enough for organs.
REGISTRATION_SPACING = 6.0
#: The z-translation search step (mm) and the least overlap (fraction of the shorter scan) a
#: candidate must keep, so that a tiny overlap cannot win on noise.
SEARCH_STEP_MM = 10.0
MIN_OVERLAP = 0.35
#: The least mutual information (nats, 32 bins) of a trusted registration. Measured on look-alike
#: pairs (CT/CT, CT/MR, one end cropped): 1.1-1.3; onto noise or a featureless ramp: below 0.1.
MIN_MUTUAL_INFORMATION = 0.3
#: Query slices resampled at a time when a drawing is carried into the query: ITK's float32 output
#: for a whole 512 x 512 x 180 CT would be 189 MB.
CARRY_SLAB = 16
_ITK_THREADS = threading.Lock()


@contextmanager
def _single_threaded() -> Iterator[None]:
    """ITK's metric ignores the method's thread count and sums in thread order, so the same pair
    registered twice could land a slice apart: one thread, for the same placement every run."""
    with _ITK_THREADS:
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


@dataclass(frozen=True)
class Placement:
    """Query slices ``first..last`` (inclusive, RAS working order) and the support position of
    query slice z: ``offset + scale * z`` (support slice units)."""

    first: int
    last: int
    offset: float
    scale: float
    rule: str  # "same volume" | "relative position" | "registration" | "all slices: <why>"

    def position(self, query_z: np.ndarray) -> np.ndarray:
        return self.offset + self.scale * np.asarray(query_z, dtype=np.float64)

    def describe(self) -> dict:
        return {"rule": self.rule, "query_slices": [self.first, self.last]}


def same_volume(depth: int) -> Placement:
    return Placement(0, depth - 1, 0.0, 1.0, "same volume")


def _extent_known(annotated: np.ndarray, config: InferenceConfig) -> bool:
    """A sparse annotation (fewer than ``min_extent_slices`` from first to last) says where the
    structure is, not how far it extends."""
    return int(annotated.max()) - int(annotated.min()) + 1 >= config.min_extent_slices


def relative_position(
    annotated: np.ndarray, support_depth: int, query_depth: int, config: InferenceConfig
) -> Placement:
    """The annotated relative z-range mapped to the query with a margin (every slice for a
    sparse annotation); the query range maps linearly onto the annotated range."""
    first, last = int(annotated.min()), int(annotated.max())
    if _extent_known(annotated, config):
        start, stop = first / support_depth, (last + 1) / support_depth
        margin = config.z_margin * (stop - start)
        q0 = max(0, int(np.floor((start - margin) * query_depth)))
        q1 = min(query_depth - 1, int(np.ceil((stop + margin) * query_depth)) - 1)
        rule = "relative position"
    else:
        q0, q1, rule = 0, query_depth - 1, "all slices: sparse annotation"
    scale = (last - first) / (q1 - q0) if q1 > q0 else 0.0
    return Placement(q0, q1, first - scale * q0, scale, rule)


def _ras_affine(volume: Volume) -> np.ndarray:
    """Voxel (RAS working array) -> world (mm)."""
    return volume.affine @ orientations.inv_ornt_aff(_to_ras(volume.affine), volume.shape)


def _in_world(
    image: sitk.Image, volume: Volume, start: tuple[int, int, int] = (0, 0, 0), bins: Sequence[int] = (1, 1, 1)
) -> sitk.Image:
    """``image`` given the volume's world geometry: its voxel 0 at the working array's voxel
    ``start``, each of its voxels a block of ``bins`` of the array's (centred on the block, as ITK's
    BinShrink places it)."""
    affine = _ras_affine(volume)
    spacing = np.asarray(ras_spacing(volume))
    direction = affine[:3, :3] / spacing
    centre = np.asarray(start) + (np.asarray(bins) - 1) / 2
    image.SetSpacing((spacing * bins).tolist())
    image.SetOrigin((affine[:3, 3] + direction @ (centre * spacing)).tolist())
    image.SetDirection(direction.flatten().tolist())
    return image


def _binned_image(volume: Volume, intensity: Intensity) -> sitk.Image:
    """The volume's normalised intensities block-averaged to about REGISTRATION_SPACING with its
    world geometry: ITK's BinShrink, the same values on the same grid, computed a slab of slices at
    a time so that the volume is never held in float32 (a 512 x 512 x 180 CT: 189 MB, and as much
    again as ITK's copy)."""
    shape = volume.data.shape
    bins = [max(1, min(int(round(REGISTRATION_SPACING / s)), n)) for s, n in zip(ras_spacing(volume), shape)]
    (bx, by, bz), (nx, ny, nz) = bins, [n // b for n, b in zip(shape, bins)]
    binned = np.empty((nz, ny, nx), dtype=np.float32)  # ITK's array order: z, y, x
    for k in range(nz):
        slab = intensity.apply(volume.data[: nx * bx, : ny * by, k * bz : (k + 1) * bz])
        binned[k] = slab.reshape(nx, bx, ny, by, bz).mean(axis=(1, 3, 4), dtype=np.float64).T  # as ITK: in double
    return _in_world(sitk.GetImageFromArray(binned), volume, bins=bins)


def _method() -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.5, 1)  # a fixed seed (0 is the wall clock): the same placement every run
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _z_extent(image: sitk.Image) -> float:
    return image.GetSpacing()[2] * image.GetSize()[2]


def register(query: sitk.Image, support: sitk.Image) -> tuple[sitk.Similarity3DTransform, float, float]:
    """The transform mapping query (fixed) points into the support (moving), the metric of the
    best z-translation start and the final metric (Mattes MI: lower is better)."""
    centred = sitk.CenteredTransformInitializer(
        query, support, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    # 1. exhaustive z-translation search around the centred start, keeping enough overlap
    reach = max(
        0.0,
        (1 - MIN_OVERLAP) * min(_z_extent(query), _z_extent(support)) / 2
        + abs(_z_extent(query) - _z_extent(support)) / 2,
    )
    steps = int(reach // SEARCH_STEP_MM)
    best_z, start_metric = 0.0, np.inf
    probe = _method()
    for k in range(-steps, steps + 1):
        candidate = sitk.Similarity3DTransform(centred)
        shift = np.asarray(candidate.GetTranslation()) + [0.0, 0.0, k * SEARCH_STEP_MM]
        candidate.SetTranslation(shift.tolist())
        probe.SetInitialTransform(candidate, inPlace=False)
        try:
            metric = probe.MetricEvaluate(query, support)
        except RuntimeError:  # too few samples overlap
            continue
        if metric < start_metric:
            best_z, start_metric = k * SEARCH_STEP_MM, metric
    transform = sitk.Similarity3DTransform(centred)
    transform.SetTranslation((np.asarray(transform.GetTranslation()) + [0.0, 0.0, best_z]).tolist())
    # 2. similarity refinement (rotation, isotropic scale, translation), coarse to fine
    refine = _method()
    refine.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 60, relaxationFactor=0.6)
    refine.SetOptimizerScalesFromPhysicalShift()
    refine.SetShrinkFactorsPerLevel([2, 1])
    refine.SetSmoothingSigmasPerLevel([1.0, 0.0])
    refine.SetInitialTransform(transform, inPlace=True)
    refine.Execute(query, support)
    return transform, float(start_metric), float(refine.GetMetricValue())


@dataclass
class Registration:
    """A support volume registered onto a query volume, once for all of its labels; ``problem``
    says why it is not trusted (None: trusted)."""

    transform: sitk.Transform | None
    support_affine: np.ndarray
    query_affine: np.ndarray
    problem: str | None = None


def register_volumes(
    support: Volume, support_intensity: Intensity, query: Volume, query_intensity: Intensity
) -> Registration:
    """Register the support volume onto the query (each one's intensities normalised by its
    :class:`~sdfsmis.io.volume.Intensity`) and judge it."""
    affines = _ras_affine(support), _ras_affine(query)
    try:
        with _single_threaded():
            fixed = _binned_image(query, query_intensity)
            transform, start, final = register(fixed, _binned_image(support, support_intensity))
    except RuntimeError as error:
        return Registration(None, *affines, f"registration failed ({str(error).strip().splitlines()[-1]})")
    if not np.isfinite(final) or final > start:
        return Registration(None, *affines, "registration did not improve on its start")
    if -final < MIN_MUTUAL_INFORMATION:
        return Registration(None, *affines, f"the volumes share too little ({-final:.2f} nats of mutual information)")
    if not 0.5 <= transform.GetScale() <= 2.0:
        return Registration(None, *affines, f"registration scale {transform.GetScale():.2f} is implausible")
    return Registration(transform, *affines)


def carried_drawing(registration: Registration, support: Volume, drawn: np.ndarray, query: Volume) -> np.ndarray:
    """The support's drawing [X, Y, Z] (bool) carried onto the query's working grid through a
    trusted ``registration`` (linear resampling, kept above one half), :data:`CARRY_SLAB` query
    slices at a time."""
    moving = _in_world(sitk.GetImageFromArray(np.ascontiguousarray(drawn.transpose(2, 1, 0), dtype=np.uint8)), support)
    width, height, depth = (int(n) for n in query.data.shape)
    carried = np.zeros(query.data.shape, dtype=bool, order="F")
    for z in range(0, depth, CARRY_SLAB):
        slab = min(CARRY_SLAB, depth - z)
        fixed = _in_world(sitk.Image([width, height, slab], sitk.sitkUInt8), query, start=(0, 0, z))  # the grid only
        values = sitk.Resample(moving, fixed, registration.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        carried[..., z : z + slab] = sitk.GetArrayViewFromImage(values).transpose(2, 1, 0) > 0.5
    return carried


def registered_position(
    registration: Registration, annotated: np.ndarray, drawn: np.ndarray, query_depth: int, config: InferenceConfig
) -> Placement:
    """The annotated slices carried into the query through ``registration``, with the relative
    rule's margin; every query slice when the registration is not trusted."""
    everything = relative_position(annotated, drawn.shape[2], query_depth, config)
    if registration.problem is not None:
        return _all_slices(everything, query_depth, registration.problem)
    transform, support_affine, query_affine = (
        registration.transform,
        registration.support_affine,
        registration.query_affine,
    )
    # query slice z at the structure's in-plane centre -> support slice position (linear in z)
    centre_world = (support_affine @ np.append(np.argwhere(drawn).mean(axis=0), 1.0))[:3]
    query_centre = np.linalg.solve(query_affine, np.append(transform.GetInverse().TransformPoint(centre_world), 1.0))

    def support_z(z: float) -> float:
        world = (query_affine @ [query_centre[0], query_centre[1], z, 1.0])[:3]
        return float(np.linalg.solve(support_affine, np.append(transform.TransformPoint(world.tolist()), 1.0))[2])

    offset = support_z(0.0)
    slope = support_z(1.0) - offset
    if abs(slope) < 1e-6:
        return _all_slices(everything, query_depth, "registration flattened the z-axis")
    if not _extent_known(annotated, config):
        return Placement(0, query_depth - 1, offset, slope, "registration (all slices: sparse annotation)")
    first, last = int(annotated.min()), int(annotated.max())
    margin = config.z_margin * (last - first + 1)
    bounds = sorted(((first - margin - offset) / slope, (last + margin - offset) / slope))
    q0, q1 = max(0, int(np.floor(bounds[0]))), min(query_depth - 1, int(np.ceil(bounds[1])))
    if q0 > q1:
        return _all_slices(everything, query_depth, "the registered structure lies outside the query")
    return Placement(q0, q1, offset, slope, "registration")


def _all_slices(relative: Placement, depth: int, why: str) -> Placement:
    """Every query slice, with the relative rule's mapping for choosing supports."""
    return Placement(0, depth - 1, relative.offset, relative.scale, f"all slices: {why}")
