"""outputs: a job's output folder, and the one front its readers share.

    contract  the files, the rows' schema and the checks of the output contract
    store     OutputStore: masks and parts written atomically, read, counted, resumed
    record    job.json: written by a run, read and compared by every later one
    reader    OutputReader: open → label space → rows in order → ok rows → masks
    order     rows in output or review order
    labelmap  a team's labels over the model's (--label-map)
"""

from ..core.lazy import public_names

_PUBLIC = {
    **dict.fromkeys(["SCHEMA", "LABEL_COLUMNS", "JOB_FILE", "SUCCESS_FILE", "MASKS_DIR", "METADATA_DIR",
                     "SCRATCH_DIR", "checked_key"], "contract"),
    **dict.fromkeys(["OutputStore", "RowCounts"], "store"),
    **dict.fromkeys(["JobRecord", "mask_settings"], "record"),
    **dict.fromkeys(["OutputReader", "open_output", "inspect_output"], "reader"),
    **dict.fromkeys(["ORDERS", "check_order", "rows_in_order"], "order"),
    **dict.fromkeys(["LabelSpace", "UNMAPPED", "read_label_map", "remap_ids"], "labelmap"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
