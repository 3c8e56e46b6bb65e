"""Job specs: read from files, URLs and the environment; alias bombs refused at once."""

from __future__ import annotations

import pytest

from seglabel.core.config import JobConfig
from seglabel.core.errors import ConfigError
from seglabel.storage.spec import load_spec


def test_specs_from_files_and_the_environment(tmp_path, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text("input: in\noutput: out\nbatch_size: 4\n")
    assert JobConfig.from_mapping(load_spec(str(spec))).engine.batch_size == 4
    monkeypatch.setenv("SPEC", "output: o\nmanifest: m.txt\n")
    assert load_spec("env:SPEC") == {"output": "o", "manifest": "m.txt"}
    for text, message in (("[1, 2]", "must be a mapping"), ("a: [", "not valid YAML"),
                          ("input: in\noutput: out\ninput: elsewhere\n", "'input' is mapped twice"),
                          # The review: two merge keys, and keys that are one value (1 and true).
                          ("a: &a {x: 1}\nb: &b {x: 2}\nc: {<<: *a, <<: *b}\n", "'<<' is mapped twice"),
                          ("1: a\ntrue: b\n", "is mapped twice")):
        spec.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_spec(str(spec))
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    named = tmp_path / "team::job.yaml"  # a local name with '::' is a path (issue 35)
    named.write_text("input: in\noutput: out\n")
    assert load_spec(str(named)) == {"input": "in", "output": "out"}


def test_yaml_alias_bombs_are_refused_at_once(tmp_path, capsys):
    """Nested aliases (nine levels of nine: 9^9 values once expanded) are refused while the
    spec is read, after a bounded walk, before any other walk of its settings; so is a spec
    past 1 MiB, and a bad alias in a ``--input-option`` value is one line, not a traceback.
    Anchors that share storage options, merge keys included, still read."""
    from seglabel.cli import main

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("output: o\ninput: i\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_spec(str(spec))
    spec.write_text("output: o\ninput: i\ninput_storage_options: &s3 {endpoint_url: 'http://127.0.0.1:9000'}\n"
                    "output_storage_options: {<<: *s3, anon: true}\nmax_pixels: 1.0e+8\n")
    config = JobConfig.from_mapping(load_spec(str(spec)))
    assert config.output_storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True}
    assert config.max_pixels == 100_000_000 and isinstance(config.max_pixels, int)
    spec.write_text("output: o\ninput: i\nnote: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="over 1 MiB"):
        load_spec(str(spec))
    assert main(["run", "--input", "i", "--output", "o", "--input-option", "a=*x"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the value of 'a=*x'" in err and "Traceback" not in err
