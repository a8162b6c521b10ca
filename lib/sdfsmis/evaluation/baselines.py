"""Training-free reference methods with the one-shot interface of
:class:`sdfsmis.methods.base.OneShotModel` (``encode_support``, ``predict`` -> ``Prediction``,
``segment`` on [N, 1, R, R] slices in [-1, 1], ``resolution``, ``device``), so that the protocol
harness and :class:`sdfsmis.pipeline.segmenter.VolumeSegmenter` run them exactly like SD-FSMIS and DPL.

- :class:`PrototypeMatcher`: PANet / ALPNet-style prototype matching on handcrafted intensity
  features (no learned features): a floor for every table.
- :class:`RegistrationPropagation`: SimpleITK affine + B-spline registration of the support slice
  onto each query slice, and the support mask warped along: a classical competitor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from sdfsmis.methods.base import Prediction


class TrainingFree:
    """What the baselines share with :class:`~sdfsmis.methods.base.OneShotModel` without being
    torch modules: ``resolution``, a CPU ``device``, ``join_supports``, ``predict_each`` (k support
    rows per query; ``predict_encoded`` the same, as their queries are not encoded apart) and
    ``segment`` = ``predict(...).probability`` with support row 0 by default. Subclasses implement
    ``encode_support`` and ``predict``."""

    method = "training-free"
    encodes_queries = False  # all of their query work depends on the support
    costly_passes = True  # kept per pass by a pipeline that keeps results, as a model's would be
    title: str
    resolution: int
    device = torch.device("cpu")

    def join_supports(self, parts: list[list]) -> list:
        """Their encoded supports are lists with one entry per row: joined in order."""
        return [row for part in parts for row in part]

    def predict(self, support, query_image: torch.Tensor, index: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def predict_each(self, support, query_image: torch.Tensor, index: torch.Tensor) -> list[Prediction]:
        return [self.predict(support, query_image, index[:, j]) for j in range(index.shape[1])]

    def predict_encoded(self, support, queries: torch.Tensor, index: torch.Tensor) -> list[Prediction]:
        return self.predict_each(support, queries, index)

    @torch.no_grad()
    def segment(self, support, query_image: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            index = torch.zeros(query_image.shape[0], dtype=torch.long)
        return self.predict(support, query_image, index).probability


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W], reflect-padded."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(x.shape[1], 1, 1, -1), groups=x.shape[1])
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(x.shape[1], 1, -1, 1), groups=x.shape[1]
    )


def intensity_features(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, R, R] -> [N, 7, R, R]: intensity at three scales, a band-pass, gradient magnitude
    and local standard deviation (sigmas in pixels of a 256 grid, scaled to R)."""
    scale = x.shape[-1] / 256
    g1, g2, g4 = (_blur(x, s * scale) for s in (1.0, 2.0, 4.0))
    gx = F.pad(g1[..., :, 1:] - g1[..., :, :-1], (0, 1))
    gy = F.pad(g1[..., 1:, :] - g1[..., :-1, :], (0, 0, 0, 1))
    local_std = (_blur(x * x, 2.0 * scale) - g2 * g2).clamp_min(0).sqrt()
    return torch.cat([x, g1, g2, g4, g1 - g4, (gx * gx + gy * gy).sqrt(), local_std], dim=1)


@dataclass
class _Prototypes:
    mean: torch.Tensor  # [C] feature standardisation of this support slice
    std: torch.Tensor
    foreground: torch.Tensor  # [P, C] unit vectors
    background: torch.Tensor  # [B, C] unit vectors


class PrototypeMatcher(TrainingFree):
    """Prototype matching (PANet's masked average pooling, cosine similarity scaled by 20) with
    ALPNet's adaptive local prototypes (windows of R/8 that are >= 95 % one class), on
    :func:`intensity_features` standardised with the support slice's statistics."""

    title = "prototype matcher (PANet-style, intensity features, training-free)"

    def __init__(self, resolution: int = 256, window: int | None = None, scaler: float = 20.0, purity: float = 0.95):
        self.resolution = resolution
        self.window = window or max(2, resolution // 8)
        self.scaler = scaler
        self.purity = purity

    def _local(self, z: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        fraction = F.avg_pool2d(region, self.window)
        pooled = F.avg_pool2d(z * region, self.window) / fraction.clamp_min(1e-6)
        keep = fraction[0, 0] >= self.purity
        return pooled[0][:, keep].T  # [P, C]

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor) -> list[_Prototypes]:
        prototypes = []
        for feats, m in zip(intensity_features(image.float()), mask.float()):
            mean, std = feats.mean(dim=(1, 2)), feats.std(dim=(1, 2)).clamp_min(1e-6)
            z = ((feats - mean[:, None, None]) / std[:, None, None])[None]
            m = m[None]
            whole = (z * m).sum(dim=(2, 3)) / m.sum().clamp_min(1.0)  # masked average pooling
            foreground = torch.cat([whole, self._local(z, m)])
            background = self._local(z, 1 - m)
            if background.shape[0] == 0:
                background = (z * (1 - m)).sum(dim=(2, 3)) / (1 - m).sum().clamp_min(1.0)
            prototypes.append(_Prototypes(mean, std, F.normalize(foreground, dim=1), F.normalize(background, dim=1)))
        return prototypes

    def _score(self, z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        similarity = self.scaler * torch.einsum("pc,chw->phw", prototypes, z)
        return (similarity.softmax(dim=0) * similarity).sum(dim=0)  # ALPNet: soft max over prototypes

    @torch.no_grad()
    def predict(self, support: list[_Prototypes], query: torch.Tensor, index: torch.Tensor) -> Prediction:
        index = index.cpu()
        out = torch.empty(query.shape[0], 1, *query.shape[2:])
        for i, feats in enumerate(intensity_features(query.float())):
            p = support[int(index[i])]
            z = F.normalize((feats - p.mean[:, None, None]) / p.std[:, None, None], dim=0)
            out[i, 0] = torch.sigmoid(self._score(z, p.foreground) - self._score(z, p.background))
        return Prediction(out.to(query.device))


def _last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


class RegistrationPropagation(TrainingFree):
    """Label propagation by registration: per query slice, the support slice (moving) is aligned
    to the query (fixed) with an affine then a B-spline transform (Mattes mutual information,
    multi-resolution), and the support mask is warped with the same transform (linear, so the
    result is a soft map). Deterministic: fixed metric-sampling seed, one thread."""

    title = "SimpleITK B-spline registration (affine + B-spline, training-free)"

    def __init__(self, resolution: int = 128, mesh: int = 6, iterations: int = 30, seed: int = 0, threads: int = 1):
        self.resolution = resolution
        self.mesh, self.iterations, self.seed, self.threads = mesh, iterations, seed, threads
        self.fallbacks: list[str] = []  # stages that failed and what was kept instead

    def encode_support(self, image: torch.Tensor, mask: torch.Tensor) -> list[tuple[sitk.Image, sitk.Image]]:
        return [
            (sitk.GetImageFromArray(i[0].float().cpu().numpy()), sitk.GetImageFromArray(m[0].float().cpu().numpy()))
            for i, m in zip(image, mask)
        ]

    def _method(self, shrink: list[int]) -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.25, self.seed)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel([s / 2 for s in shrink])
        method.SetNumberOfThreads(self.threads)
        return method

    def _ran(self, method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, failed: str) -> bool:
        """Run one stage; where it fails, say so in ``fallbacks`` (the caller keeps the previous one)."""
        try:
            method.Execute(fixed, moving)
        except RuntimeError as error:
            self.fallbacks.append(f"{failed}: {_last_line(error)}")
            return False
        return True

    def register(self, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
        """The transform that maps fixed-image points into the moving image.

        It starts from the centred (geometry) transform; a stage that ITK cannot run (e.g. "All
        samples map outside moving image buffer" on a pair with little overlap) falls back to the
        previous one: B-spline -> affine -> the centred start. ``self.fallbacks`` says which."""
        affine = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(2), sitk.CenteredTransformInitializerFilter.GEOMETRY
        )
        start = sitk.AffineTransform(affine)
        linear = self._method([4, 2, 1])
        linear.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, self.iterations, relaxationFactor=0.7)
        linear.SetOptimizerScalesFromPhysicalShift()
        linear.SetInitialTransform(affine, inPlace=True)
        if not self._ran(linear, fixed, moving, "affine failed, centred start kept"):
            return start
        bspline = sitk.BSplineTransformInitializer(fixed, [self.mesh, self.mesh])
        deformable = self._method([2, 1])
        deformable.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=self.iterations)
        deformable.SetMovingInitialTransform(affine)
        deformable.SetInitialTransform(bspline, inPlace=True)
        if not self._ran(deformable, fixed, moving, "B-spline failed, affine kept"):
            return affine
        return sitk.CompositeTransform([affine, bspline])  # B-spline applied first, then the affine

    @torch.no_grad()
    def predict(self, support, query: torch.Tensor, index: torch.Tensor) -> Prediction:
        index = index.cpu()
        out = torch.empty(query.shape[0], 1, *query.shape[2:])
        for i, q in enumerate(query):
            fixed = sitk.GetImageFromArray(q[0].float().cpu().numpy())
            moving, mask = support[int(index[i])]
            transform = self.register(fixed, moving)
            warped = sitk.Resample(mask, fixed, transform, sitk.sitkLinear, 0.0)
            out[i, 0] = torch.from_numpy(sitk.GetArrayFromImage(warped)).clamp(0, 1)
        return Prediction(out.to(query.device))
