"""Image distances with one interface: ``d(x, y) -> [N]`` for images in ``[0, 1]`` (higher = more different)."""

from ood_bench.distances.base import DISTANCES, IMAGE_DISTANCES, Distance, build_distance

__all__ = ["DISTANCES", "IMAGE_DISTANCES", "Distance", "build_distance"]
