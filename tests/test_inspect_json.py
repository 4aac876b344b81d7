"""`inspect --json` makes and writes the tensors' records one at a time (reports.Records,
cli.common.print_json): its text must stay what one json.dumps per record always wrote."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from ckptsurgery.ops import inspect_checkpoint


def document(doc: dict, ascii: bool = False) -> str:
    """The text print_json writes: one record per line for a list of records."""
    dump = lambda value: json.dumps(value, ensure_ascii=ascii)  # noqa: E731
    entries = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            entries.append(f"  {dump(key)}: [\n" + ",\n".join("    " + dump(v) for v in value) + "\n  ]")
        else:
            entries.append(f"  {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(entries) + "\n}\n"


@pytest.fixture
def odd_pth(tmp_path):
    """Tied names, a view, a non-ASCII name, a quantized tensor: every kind of record."""
    t = torch.arange(6.0).reshape(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        q = torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.qint8)
    path = tmp_path / "odd.pth"
    torch.save({"wé": t, "tied": t, "view": t.t(), "q": q, "b": torch.zeros(3, dtype=torch.int64)}, path)
    return path


@pytest.mark.parametrize("options", [[], ["--stats", "--hash"], ["--tree"], ["--keys", "tied"]])
def test_json_is_the_report_one_record_a_line(cli, odd_pth, options):
    result = cli("inspect", odd_pth, "--json", *options)
    assert result.code == 0, result.err
    report = inspect_checkpoint(str(odd_pth), stats="--stats" in options, hash="--hash" in options,
                                tree="--tree" in options, keys=["tied"] if "--keys" in options else None)
    assert result.out == document(report.to_json())
    assert json.loads(result.out)["tensors"] == report.tensors


def test_json_of_a_dcp_folder_is_the_report(cli, tmp_path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"model": {f"layers.{i}.w": torch.full((i + 1,), float(i)) for i in range(5)}},
                 checkpoint_id=str(tmp_path / "ckpt"))
    result = cli("inspect", tmp_path / "ckpt", "--json")
    assert result.code == 0, result.err
    assert result.out == document(inspect_checkpoint(str(tmp_path / "ckpt")).to_json())


def test_a_lone_surrogate_escapes_the_whole_document(cli, tmp_path, odd_pth):
    """A path that is not valid text (an undecodable byte) cannot be written as UTF-8: every
    non-ASCII character of the document is escaped, the records' too."""
    folder = tmp_path / os.fsdecode(b"\xff")
    folder.mkdir()
    path = folder / "odd.pth"
    os.rename(odd_pth, path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    assert result.out == document(inspect_checkpoint(str(path)).to_json(), ascii=True)
    assert "w\\u00e9" in result.out


def test_records_read_as_the_list_of_them(odd_pth):
    report = inspect_checkpoint(str(odd_pth))
    records = list(report.tensors)
    assert report.tensors == records and records == report.tensors and len(report.tensors) == 5
    assert report.tensors[-1] == records[-1] and report.tensors[1:3] == records[1:3]
    with pytest.raises(IndexError):
        report.tensors[5]
    assert report.to_json()["tensors"] == records and type(report.to_json()["tensors"]) is list
    assert records[1]["shares_with"] == "wé" and records[2]["contiguous"] is False and "quantization" in records[3]
