"""Aspect-ratio buckets: each photo trains in its own shape, at about the training area, instead of a square crop.

- `bucket_sizes(resolution, max_aspect=..., step=...)`: the bucket sizes, (height, width) in multiples of `step`, each
  of about `resolution`² pixels, from the square to the widest and tallest shape `max_aspect` allows.
- `nearest_bucket(width, height, sizes)`: the bucket whose aspect ratio is nearest a photo's.
- `plan_buckets(...)` -> `BucketPlan`: the bucket of each photo. A photo that would have to be upscaled more than
  `max_upscale` to cover its bucket trains in a smaller bucket of the same shape instead (`BucketPlan.shrunk` names
  them, for the one warning the data module gives).
- `buckets_for(config, photos)`: the run's plan, or None when its photos train as square crops (`data.buckets`).

A photo is resized to cover its bucket (the smallest scale at which both sides reach the bucket's) and cropped to
it, so the crop cuts only the excess of one side. `lrkit.training.module.StepSampler` takes the plan's groups so that
every batch holds samples of one bucket only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

BUCKETLESS_METHODS = ("concept_em",)
"""Methods whose data stay square crops (concept_em estimates its masks on the center crop of each image)."""


def bucket_sizes(resolution: int, *, max_aspect: float = 2.0, step: int = 64) -> list[tuple[int, int]]:
    """The buckets of a training area of `resolution`² pixels, as (height, width), sorted.

    For every landscape width w (a multiple of `step`, from the square on), the height is the multiple of `step`
    nearest resolution² / w; a shape is kept while its long side is at most `max_aspect` times its short side.
    Each landscape bucket comes with its portrait transpose, so the set is symmetric. At 512 px, step 64 and
    max_aspect 2: 512x512, 448x576, 384x640, 384x704 (height x width) and their transposes.
    """
    if resolution < step or step < 1:
        raise ValueError(f"bucket_sizes: resolution ({resolution}) must be >= step ({step}) >= 1")
    if max_aspect < 1:
        raise ValueError(f"bucket_sizes: max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    sizes = set()
    width = max(step, round(resolution / step) * step)
    while True:
        height = round(area / (width * step)) * step
        if height > width:  # the nearest-area height of a width just above the square's side
            width += step
            continue
        if height < step or width > max_aspect * height:
            break
        sizes.add((height, width))
        sizes.add((width, height))
        width += step
    return sorted(sizes)


def _aspect_distance(width: int, height: int, size: tuple[int, int]) -> Fraction:
    """How far apart two aspect ratios are, as the ratio of the larger to the smaller (1: equal); exact."""
    photo, bucket = Fraction(width, height), Fraction(size[1], size[0])
    return max(photo / bucket, bucket / photo)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) of `sizes` whose aspect ratio is nearest the photo's `width` / `height`;
    between two equally near, the one first in `sizes`."""
    return min(sizes, key=lambda size: _aspect_distance(width, height, size))


def cover_scale(width: int, height: int, size: tuple[int, int]) -> float:
    """The scale at which a `width` x `height` photo covers the bucket `size` (height, width)."""
    return max(size[0] / height, size[1] / width)


@dataclass(frozen=True)
class BucketPlan:
    """The bucket (height, width) of each photo; sample `i` (a sample counter) shows photo `i % len(photo_sizes)`."""

    photo_sizes: tuple[tuple[int, int], ...]
    """Per photo, the (height, width) it trains at."""
    shrunk: tuple[str, ...] = ()
    """`name (WxH px): HxW -> HxW` of the photos put in a smaller bucket than their aspect ratio's, so as not to be
    upscaled more than max_upscale."""

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The buckets in use, sorted."""
        return sorted(set(self.photo_sizes))

    def size_of(self, index: int) -> tuple[int, int]:
        """The bucket of sample `index` (its photo's)."""
        return self.photo_sizes[index % len(self.photo_sizes)]

    def groups(self, size: int) -> list[list[int]]:
        """The sample indices 0..size-1, grouped by bucket (in `sizes` order)."""
        order = {s: k for k, s in enumerate(self.sizes)}
        groups: list[list[int]] = [[] for _ in order]
        for i in range(size):
            groups[order[self.size_of(i)]].append(i)
        return [g for g in groups if g]

    def record(self) -> list[list[int]]:
        """Per photo, [height, width]: what a run's record keeps (`lrkit.training.folder.training_inputs`)."""
        return [list(s) for s in self.photo_sizes]


def plan_buckets(photos: list[tuple[str, int, int]], *, resolution: int, max_aspect: float = 2.0, step: int = 64,
                 max_upscale: float = 2.0) -> BucketPlan:
    """The bucket of each photo, given as (name, width, height): the nearest by aspect ratio (`nearest_bucket`), or,
    when covering it would take a scale above `max_upscale`, that bucket scaled down to what the photo covers at
    `max_upscale` (each side rounded down to a multiple of `step`, at least `step`)."""
    sizes = bucket_sizes(resolution, max_aspect=max_aspect, step=step)
    chosen, shrunk = [], []
    for name, width, height in photos:
        size = nearest_bucket(width, height, sizes)
        scale = cover_scale(width, height, size)
        if scale > max_upscale:
            factor = max_upscale / scale
            smaller = tuple(max(step, math.floor(side * factor / step) * step) for side in size)
            shrunk.append(f"{name} ({width}x{height} px): {size[0]}x{size[1]} -> {smaller[0]}x{smaller[1]}")
            size = smaller
        chosen.append(size)
    return BucketPlan(tuple(chosen), tuple(shrunk))


def buckets_for(config, photos) -> BucketPlan | None:
    """The bucket plan of a run's `photos` (`lrkit.photos.Photo`s) under `config` (a `TrainConfig`), or None when they
    train as square crops: `data.buckets` false; or `auto` and every photo's nearest bucket is the same (one shape),
    the resolution is below one bucket step, or the method keeps square crops (`BUCKETLESS_METHODS`)."""
    data = config.data
    if data.buckets is False or (data.buckets == "auto" and config.method in BUCKETLESS_METHODS):
        return None
    shapes = [(p.name, *p.image.size) for p in photos]
    if data.buckets == "auto":
        if data.bucket_step > data.resolution:  # too small a picture to bucket in these steps
            return None
        sizes = bucket_sizes(data.resolution, max_aspect=data.max_aspect, step=data.bucket_step)
        if len({nearest_bucket(w, h, sizes) for _, w, h in shapes}) < 2:
            return None
    return plan_buckets(shapes, resolution=data.resolution, max_aspect=data.max_aspect, step=data.bucket_step,
                        max_upscale=data.max_upscale)


__all__ = ["BUCKETLESS_METHODS", "BucketPlan", "bucket_sizes", "buckets_for", "cover_scale", "nearest_bucket",
           "plan_buckets"]
