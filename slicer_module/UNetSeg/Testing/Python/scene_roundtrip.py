"""Label map -> segmentation -> label map through UNetSegScene on a real MRML scene; prints a JSON report.

Runs in Slicer's Python or in plain Python with ``slicer-core`` (the tests use .venv-slicer):

    python scene_roundtrip.py --volume V.nii.gz --label L.nii.gz --names '{"a": 2, "b": 41}' --outdir OUT [--delete b]

Writes OUT/exported.nii.gz (through the colour table), OUT/positional.nii.gz (Slicer's export
without a colour table, for comparison) and, with --delete, OUT/edited.nii.gz (that segment
deleted, as a clinician's correction). The report lists the imported segments {name: value}
and the errors raised for an unknown segment name and an unnamed label value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import slicer  # noqa: E402
import UNetSegScene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volume", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--names", required=True, help="JSON {name: value} as the server's label_names")
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--delete", default=None, help="segment to delete before writing edited.nii.gz")
    args = ap.parse_args()
    names = {k: int(v) for k, v in json.loads(args.names).items()}
    os.makedirs(args.outdir, exist_ok=True)
    report: dict = {}

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # the segmentations logic must exist on the scene before importing
    volume = UNetSegScene.read_volume(scene, args.volume, name="reference")

    t0 = time.time()
    segmentation = UNetSegScene.import_label(scene, logic, args.label, names, volume)
    report["import_s"] = round(time.time() - t0, 3)
    report["segments"] = UNetSegScene.segment_values(segmentation)

    t0 = time.time()
    UNetSegScene.export_label(scene, logic, segmentation, volume, names, os.path.join(args.outdir, "exported.nii.gz"))
    report["export_s"] = round(time.time() - t0, 3)

    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    plain = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic.ExportSegmentsToLabelmapNode(
        segmentation, ids, plain, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    UNetSegScene.write_volume(scene, plain, os.path.join(args.outdir, "positional.nii.gz"))

    if args.delete:
        segment_id = seg.GetSegmentIdBySegmentName(args.delete)
        if not segment_id:
            raise SystemExit(f"--delete {args.delete}: no such segment")
        seg.RemoveSegment(segment_id)
        UNetSegScene.export_label(scene, logic, segmentation, volume, names, os.path.join(args.outdir, "edited.nii.gz"))
        report["segments_after_delete"] = UNetSegScene.segment_values(segmentation)

    seg.AddEmptySegment("", "not_a_label")
    try:
        UNetSegScene.export_label(scene, logic, segmentation, volume, names, os.path.join(args.outdir, "never.nii.gz"))
        report["unknown_segment_error"] = None
    except ValueError as e:
        report["unknown_segment_error"] = str(e)

    fewer = dict(list(names.items())[1:])
    try:
        UNetSegScene.import_label(scene, logic, args.label, fewer, volume, name="partial")
        report["unnamed_value_error"] = None
    except ValueError as e:
        report["unnamed_value_error"] = str(e)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
