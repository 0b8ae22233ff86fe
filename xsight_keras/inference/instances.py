"""From pixel outputs to individual nuclei: marker-controlled watershed and a type per nucleus.

With an instance head (two channels: a distance map normalised to 1 at each nucleus' centre,
and a contour probability), markers are the confident nucleus cores
(``distance > dist_threshold`` and ``contour < contour_threshold``) and the watershed floods the
negative distance inside the foreground. Without one, the distance transform of the predicted
foreground stands in for the distance map (classic separation of touching blobs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from xsight_keras.heads import INSTANCE, get_head, is_class_map
from xsight_keras.labels import CLASS_COLOURS, instance_classes, relabel_sequential


@dataclass(frozen=True)
class PostprocessConfig:
    """Watershed settings (tune them on the validation split: ``scripts/tune_postprocessing.py``).

    ``dist_threshold``: a marker's least normalised distance (instance head; the distance
    transform without a head). ``contour_threshold``: a marker's most boundary evidence, the
    instance head's contour probability or the hv head's gradient energy
    (:meth:`xsight_keras.heads.HoverHead.markers`). ``min_marker_size``, ``min_size``: markers
    and nuclei with fewer pixels are dropped.
    """

    dist_threshold: float = 0.6
    contour_threshold: float = 0.5
    min_marker_size: int = 4
    min_size: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


def foreground_and_labels(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, K) probabilities → (foreground bool (H, W), class labels uint8 (H, W))."""
    if probabilities.shape[-1] == 1:
        fg = probabilities[..., 0] >= 0.5
        return fg, fg.astype(np.uint8)
    labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    return labels > 0, labels


def separate_instances(probabilities: np.ndarray, instance_maps: np.ndarray | None = None,
                       config: PostprocessConfig = PostprocessConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Turn model outputs into nuclei.

    ``probabilities`` float (H, W, K) class probabilities (K = 1: binary); ``instance_maps``
    optional: the instance head's float (H, W, 2) maps, or a dict of head outputs (the
    predictor's :meth:`~xsight_keras.inference.Predictor.predict_maps`) whose first
    nucleus-separating head supplies the markers. Returns ``instances``
    int32 (H, W) with ids 1..n and ``types`` int (n + 1,) giving each id's class by majority vote
    (``types[0]`` unused).
    """
    fg, labels = foreground_and_labels(probabilities)
    found = _head_markers(fg, instance_maps, config)
    if found is not None:
        cores, surface = found
    else:
        distance = ndimage.distance_transform_edt(fg)
        peak = ndimage.maximum_filter(distance, size=5)
        cores = fg & (distance >= np.maximum(peak * config.dist_threshold, 1.0)) & (distance > 0)
        cores &= distance >= config.dist_threshold * ndimage.maximum_filter(distance, size=15)
        surface = -distance
    markers, n = ndimage.label(cores)
    if n and config.min_marker_size > 1:
        sizes = np.bincount(markers.ravel())
        markers[sizes[markers] < config.min_marker_size] = 0
    instances = watershed(surface, markers, mask=fg).astype(np.int32)
    if config.min_size > 1 and instances.max():
        sizes = np.bincount(instances.ravel())
        instances[sizes[instances] < config.min_size] = 0
    instances, _ = relabel_sequential(instances)
    num_classes = max(int(labels.max()) + 1, 2)
    return instances, instance_classes(instances, labels, num_classes)


def _head_markers(foreground, maps, config):
    """Markers and flooding surface from the first head in ``maps`` that separates nuclei
    (:meth:`xsight_keras.heads.Head.markers`); ``None`` when there is none. ``maps`` is a dict
    of head outputs (from :meth:`Predictor.predict_maps`), one array (the instance head's), or
    ``None``."""
    if maps is None:
        return None
    if not isinstance(maps, dict):
        maps = {INSTANCE: maps}
    for name, values in maps.items():
        if not is_class_map(name):
            found = get_head(name).markers(foreground, values, config)
            if found is not None:
                return found
    return None


def instance_targets(instances: np.ndarray) -> np.ndarray:
    """The instance head's training target for an instance map: float32 (H, W, 2); see
    :meth:`xsight_keras.heads.InstanceHead.target`."""
    return get_head(INSTANCE).target(instances)


def nucleus_outline(mask: np.ndarray) -> np.ndarray | None:
    """int32 (P, 2) x, y outline (not closed) of the largest region of a bool (h, w) ``mask``,
    in the mask's pixels; ``None`` when it has fewer than 3 points (no area to draw)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)[:, 0, :]
    return outline if len(outline) >= 3 else None


def detection_feature(ring: list, cls: int, class_names=None, feature_id: str | None = None,
                      measurements: dict | None = None) -> dict:
    """One nucleus as the GeoJSON ``Feature`` QuPath imports as a detection: ``ring`` its
    outline [[x, y], …] (closed here if it is not), ``cls`` its class index (named by
    ``class_names``, ``class_<i>`` otherwise, coloured as in :data:`CLASS_COLOURS`),
    ``measurements`` {name: number} shown in QuPath's measurement table."""
    if ring[0] != ring[-1]:
        ring = [*ring, ring[0]]
    name = class_names[cls] if class_names is not None and cls < len(class_names) else f"class_{cls}"
    properties = {"objectType": "detection",
                  "classification": {"name": name,
                                     "color": CLASS_COLOURS[cls % len(CLASS_COLOURS)].tolist()}}
    if measurements:
        properties["measurements"] = measurements
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": properties}
    if feature_id is not None:
        feature["id"] = feature_id
    return feature


def instances_to_geojson(instances: np.ndarray, types=None, class_names=None) -> dict:
    """A GeoJSON FeatureCollection with one polygon per nucleus, as QuPath imports detections.

    ``instances`` int (H, W); ``types`` the class of each id (from :func:`separate_instances`);
    ``class_names`` names per class index. Coordinates are pixels (x right, y down), each ring
    closed; a nucleus whose outline has fewer than 3 points is left out.
    """
    features = []
    for iid, window in enumerate(ndimage.find_objects(instances), start=1):
        if window is None:
            continue
        outline = nucleus_outline(instances[window] == iid)
        if outline is None:
            continue
        ring = (outline + [window[1].start, window[0].start]).tolist()
        cls = int(types[iid]) if types is not None and iid < len(types) else 1
        features.append(detection_feature(ring, cls, class_names, str(iid)))
    return {"type": "FeatureCollection", "features": features}
