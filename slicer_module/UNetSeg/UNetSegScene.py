"""UNetSegScene: label map <-> segmentation on an MRML scene, keeping the server's label values.

Works on any MRML scene and segmentations logic: Slicer's own (``slicer.mrmlScene``,
``slicer.modules.segmentations.logic()``) inside the application, or a bare
``slicer.vtkMRMLScene()`` with a ``vtkSlicerSegmentationsModuleLogic`` from the ``slicer-core``
package in plain Python (how the tests exercise it). Files are read and written through MRML
storage nodes, not ``slicer.util.load*`` (which needs the application).

Why a colour table: Slicer's positional import (value k -> k-th name) drops values past the
end, and an export without a colour table renumbers segments 1..N. A colour table built from
the server's ``label_names`` (``{name: value}``) makes import name each segment by its value and
export write each segment back with the value of its NAME, so non-contiguous values (FreeSurfer
codes 2, 3, 41, ...) survive both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import slicer
from UNetSegLib import colour_table

COLOUR_NODE_NAME = "UNetSegColours"


def colour_node(scene: Any, label_names: Mapping[str, int], name: str = COLOUR_NODE_NAME) -> Any:
    """The scene's colour table for ``label_names`` (created, or refreshed when it exists)."""
    table = colour_table(label_names)
    if not table:
        raise ValueError("the server sent no label names; cannot build a colour table")
    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLColorTableNode"):
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(e["value"] for e in table) + 1)
    for value in range(node.GetNumberOfColors()):
        node.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)  # unnamed values stay unnamed (not imported)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for e in table:
        node.SetColor(e["value"], e["name"], *e["rgb"], 1.0)
    return node


def read_volume(scene: Any, path: str, labelmap: bool = False, name: str | None = None) -> Any:
    """A scalar (or label map) volume node read from ``path`` (NIfTI, NRRD, MHA, ...)."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or "")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    ok = storage.ReadData(node)
    scene.RemoveNode(storage)
    if not ok:
        scene.RemoveNode(node)
        raise ValueError(f"could not read {path} as a {'label map' if labelmap else 'volume'}")
    return node


def write_volume(scene: Any, node: Any, path: str) -> str:
    """Write a volume node to ``path`` (format from the extension); returns ``path``."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    storage.SetUseCompression(True)
    ok = storage.WriteData(node)
    scene.RemoveNode(storage)
    if not ok:
        raise OSError(f"could not write {path}")
    return path


def segment_values(segmentation_node: Any) -> dict[str, int]:
    """``{segment name: label value}`` of a segmentation node, in segment order."""
    seg = segmentation_node.GetSegmentation()
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetSegment(seg.GetNthSegmentID(i))
        out[segment.GetName()] = int(segment.GetLabelValue())
    return out


def import_label(
    scene: Any,
    logic: Any,
    label_path: str,
    label_names: Mapping[str, int],
    reference_volume: Any,
    name: str = "UNetSeg",
) -> Any:
    """A segmentation node from a server label file: one segment per present value, named by ``label_names``.

    Values the server did not name raise ``ValueError`` (they would otherwise become segments
    with made-up names).
    """
    colours = colour_node(scene, label_names)
    labelmap = read_volume(scene, label_path, labelmap=True, name=f"{name}_import")
    try:
        present = _present_values(labelmap)
        unnamed = sorted(present - {int(v) for v in label_names.values()})
        if unnamed:
            raise ValueError(f"label values {unnamed} in {label_path} have no name in {dict(label_names)}")
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(colours.GetID())
        labelmap.SetAndObserveDisplayNodeID(display.GetID())
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        if reference_volume is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            scene.RemoveNode(segmentation)
            raise ValueError(f"Slicer could not import {label_path} into a segmentation")
        return segmentation
    finally:
        display_node = labelmap.GetDisplayNode()
        if display_node is not None:
            scene.RemoveNode(display_node)
        scene.RemoveNode(labelmap)


def export_label(
    scene: Any, logic: Any, segmentation: Any, reference_volume: Any, label_names: Mapping[str, int], path: str
) -> str:
    """Write every segment (hidden ones too) as one label map on the reference grid, values from the segment NAMES.

    A segment whose name the server does not know raises ``ValueError`` naming it (rename it to
    one of the server's labels or delete it); nothing is renumbered.
    """
    names = segment_values(segmentation)
    unknown = sorted(n for n in names if n not in label_names)
    if unknown:
        raise ValueError(
            f"segments {unknown} are not labels of this model ({sorted(label_names)}); "
            "rename or delete them before submitting"
        )
    colours = colour_node(scene, label_names)
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = logic.ExportSegmentsToLabelmapNode(
            segmentation, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colours
        )
        if not ok:
            raise ValueError("Slicer could not export the segmentation to a label map")
        return write_volume(scene, labelmap, path)
    finally:
        scene.RemoveNode(labelmap)


def _present_values(labelmap: Any) -> set[int]:
    """Distinct non-zero voxel values of a label map node."""
    import numpy as np
    from vtk.util.numpy_support import vtk_to_numpy

    image = labelmap.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        return set()
    return set(np.unique(vtk_to_numpy(image.GetPointData().GetScalars())).tolist()) - {0}
