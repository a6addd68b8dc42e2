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


def volume_nodes(scene: Any, paths: list[str], names: list[str] | None = None) -> list[Any]:
    """Scalar volume nodes read from local files (one per modality of a study)."""
    return [read_volume(scene, p, name=(names[i] if names else None)) for i, p in enumerate(paths)]


def _table(scene: Any, name: str, columns: dict[str, list]) -> Any:
    """A table node ``name`` (created or emptied) with one column per entry: floats, or strings for text lists."""
    import vtk

    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLTableNode"):
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(0)
    rows = max((len(v) for v in columns.values()), default=0)
    for col, values in columns.items():
        text = any(isinstance(v, str) for v in values)
        arr = vtk.vtkStringArray() if text else vtk.vtkDoubleArray()
        arr.SetName(col)
        arr.SetNumberOfValues(rows)
        for i, v in enumerate(values):
            arr.SetValue(i, str(v) if text else (float("nan") if v is None else float(v)))
        table.AddColumn(arr)
    table.SetNumberOfRows(rows)
    node.Modified()
    return node


def _series(scene: Any, name: str, table: Any, x: str, y: str, bar: bool, rgb: tuple[float, float, float]) -> Any:
    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLPlotSeriesNode"):
        node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    node.SetAndObserveTableNodeID(table.GetID())
    node.SetXColumnName(x)
    node.SetYColumnName(y)
    node.SetPlotType(node.PlotTypeBar if bar else node.PlotTypeScatter)
    if not bar:
        node.SetMarkerStyle(node.MarkerStyleCircle)
    node.SetColor(*rgb)
    return node


def _chart(scene: Any, name: str, series: list[Any], title: str, x_title: str, y_title: str) -> Any:
    chart = scene.GetFirstNodeByName(name)
    if chart is None or not chart.IsA("vtkMRMLPlotChartNode"):
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.RemoveAllPlotSeriesNodeIDs()
    for s in series:
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    return chart


def plot_overview(scene: Any, model: str, overview: Mapping[str, Any]) -> tuple[Any, Any]:
    """Plot chart nodes for one model's ``UNetSegLogic.overview()`` entry: (training curve, per-class Dice).

    The curve has the training loss and the validation mean Dice per epoch of the last training;
    the bars are the per-class validation Dice of the serving version (or of the last training).
    The widget shows them in ``qMRMLPlotWidget``s; the nodes are plain MRML (testable on slicer-core).
    """
    curve = overview.get("curve") or {}
    table = _table(
        scene,
        f"UNetSeg {model} curve",
        {
            "epoch": list(curve.get("epoch") or []),
            "train loss": list(curve.get("train_loss") or []),
            "val mean Dice": list(curve.get("val_mean_dice") or []),
        },
    )
    loss = _series(scene, f"UNetSeg {model} train loss", table, "epoch", "train loss", False, (0.85, 0.4, 0.1))
    dice = _series(scene, f"UNetSeg {model} val Dice", table, "epoch", "val mean Dice", False, (0.1, 0.45, 0.85))
    curve_chart = _chart(scene, f"UNetSeg {model} training", [loss, dice], f"{model}: last training", "epoch", "")
    per_class = overview.get("per_class") or {}
    names = list(per_class)
    bars_table = _table(
        scene,
        f"UNetSeg {model} per-class",
        {"index": list(range(1, len(names) + 1)), "class": names, "Dice": [per_class[n] for n in names]},
    )
    bars = _series(scene, f"UNetSeg {model} Dice per class", bars_table, "index", "Dice", True, (0.2, 0.65, 0.3))
    bars.SetLabelColumnName("class")
    version = overview.get("per_class_version") or ""
    bar_chart = _chart(
        scene, f"UNetSeg {model} per-class chart", [bars], f"{model} {version}: validation Dice per class", "", "Dice"
    )
    return curve_chart, bar_chart
