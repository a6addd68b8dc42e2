"""Label maps as DICOM SEG and back, written and read with highdicom (no external binary).

* ``label_to_seg``: an integer label volume in a series' voxel grid -> a binary DICOM SEG
  referencing the source series' instances, one segment (name, value, colour) per label. Labels
  submitted by people are ``MANUAL`` and carry the labels present (an empty one is refused); model
  output is ``AUTOMATIC`` and carries every label of the model, empty ones included, so a viewer
  always shows the model's structures.
* ``seg_to_label``: a SEG of that series -> the label volume again (segments mapped back to the
  label values recorded in their descriptions), voxel-identical.

The voxel grid is the one ``lib.dicomseries.series_to_volume`` gives: axis 0 along a row, axis 1
down a column, axis 2 along the slice normal (slices in ``ordered_instances`` order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from .dicomseries import ordered_instances
from .validation import InputError

#: display colours of label values 1, 2, ... (sRGB), cycled
PALETTE_RGB = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def display_colour(value: int) -> tuple[int, int, int]:
    """The recommended display colour of a label value: the palette's sRGB as DICOM scaled CIELab."""
    rgb = np.array(PALETTE_RGB[(value - 1) % len(PALETTE_RGB)], dtype=np.float64) / 255.0
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (
        int(round(lab[0] * 65535 / 100)),
        int(round((lab[1] + 128) * 65535 / 255)),
        int(round((lab[2] + 128) * 65535 / 255)),
    )


def label_to_seg(
    label: np.ndarray,
    instances: Sequence[Dataset],
    labels: Mapping[str, int],
    *,
    manual: bool = True,
    series_description: str = "unet_seg label",
) -> Dataset:
    """A DICOM SEG of ``label`` (shape = the series' volume) over the source ``instances`` (see module docstring)."""
    source = ordered_instances(instances)
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    if label.shape != (cols, rows, len(source)):
        raise InputError(
            f"label shape {tuple(label.shape)} does not match the series' volume {(cols, rows, len(source))}"
        )
    present = sorted(int(v) for v in np.unique(label) if v != 0)
    by_value = {v: n for n, v in labels.items() if v != 0}
    unknown = [v for v in present if v not in by_value]
    if unknown:
        raise InputError(f"label values {unknown} are not among the model's labels {dict(labels)}")
    if manual and not present:
        raise InputError("the label is empty: a DICOM SEG needs at least one segment")
    values = present if manual else sorted(by_value)
    frames = np.stack([label[:, :, k].T for k in range(len(source))])  # (slices, rows, cols)
    mask = np.zeros(frames.shape, dtype=np.uint8)
    segments = []
    algorithm = (
        None
        if manual
        else hd.AlgorithmIdentificationSequence(name="unet_seg", version="1", family=codes.DCM.ArtificialIntelligence)
    )
    for number, value in enumerate(values, start=1):
        mask[frames == value] = number
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=by_value[value],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL
                if manual
                else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"label value {value}",
            )
        )
        segments[-1].RecommendedDisplayCIELabValue = list(display_colour(value))
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="unet_seg",
        manufacturer_model_name="unet_seg",
        software_versions="0.1.0",
        device_serial_number="0",
        series_description=series_description,
    )
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime  # the newest SEG of a series is its label
    return seg


def seg_to_label(seg: Dataset, instances: Sequence[Dataset], labels: Mapping[str, int]) -> np.ndarray:
    """The label volume a SEG of this series holds (segment labels mapped to the model's values)."""
    source = ordered_instances(instances)
    parsed = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    uids = [ds.SOPInstanceUID for ds in source]
    numbers = list(parsed.segment_numbers)
    names = {n: parsed.get_segment_description(n).SegmentLabel for n in numbers}
    unknown = sorted(set(names.values()) - set(labels))
    if unknown:
        raise InputError(f"the SEG has segments {unknown} that are not labels of this model ({', '.join(labels)})")
    pixels = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, assert_missing_frames_are_empty=True
    )  # (slices, rows, cols, segs)
    label = np.zeros(pixels.shape[:3], dtype=np.uint8)
    for i, n in enumerate(numbers):
        label[pixels[..., i] > 0] = labels[names[n]]
    return np.stack([label[k].T for k in range(label.shape[0])], axis=-1)
