"""formats: a job's labels in annotation tools' own import formats, one file per format.

    export        export(): the entry point and the writers' table
    writer        what every format shares: options, the segment filter, the Writer base
    coco          COCO instances and CVAT ("COCO 1.0")
    panoptic      COCO panoptic
    label_studio  Label Studio tasks and their labeling config
    polygons      masks as polygons (--mask-format polygon)
"""

from ..core.lazy import public_names

_PUBLIC = {
    # export(), the entry point, is seglabel.formats.export.export: a public name may not be a
    # module's (once the module is imported, the package's attribute is the module).
    **dict.fromkeys(["FORMATS", "MASK_FORMATS", "WRITERS"], "export"),
    **dict.fromkeys(["ExportOptions", "Writer"], "writer"),
    "coco_annotation": "coco",
    **dict.fromkeys(["label_studio_rle", "labeling_config"], "label_studio"),
    **dict.fromkeys(["DEFAULT_TOLERANCE", "outline", "coco_polygons"], "polygons"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
