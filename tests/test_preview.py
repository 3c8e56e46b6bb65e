"""The preview keeps the run's guards on the photos it reads."""

from __future__ import annotations

import os

from helpers import drawn, hand_made_output, ok_row


def test_preview_keeps_the_runs_guards(tmp_path, caplog):
    """A small PNG declaring 16000x16000 (768 MB decoded) and a FIFO in place of a photo are
    skipped with a warning; the readable photo is previewed."""
    from PIL import Image

    from seglabel.preview import preview

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("1", (16000, 16000)).save(photos / "bomb.png")
    os.mkfifo(photos / "fifo.png")
    drawn(4, 3, 1).save(photos / "good.png")
    rows = [ok_row("bomb.png", (photos / "bomb.png").as_uri(), 16000, 16000),
            ok_row("fifo.png", (photos / "fifo.png").as_uri()),
            ok_row("good.png", (photos / "good.png").as_uri())]
    out = hand_made_output(tmp_path / "out", rows, {"0": "x"})
    with caplog.at_level("WARNING"):
        paths = preview(str(out), str(tmp_path / "preview"))
    assert [os.path.basename(p) for p in paths] == ["good.png.png"]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping bomb.png" in skipped and "skipping fifo.png" in skipped
