"""The quickstart's steps, reduced to tiny sizes, so a broken `make quickstart` fails CI."""

import json

from PIL import Image

from memmit.quickstart import main


def test_quickstart_reduced(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "qs"
    argv = ["--output_dir", str(out), "--pretrain_steps", "4", "--num_unique", "16", "--copies", "4",
            "--num_rounds", "1", "--num_samples", "8", "--num_inference_steps", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("pretrained", "memmit", "paper", "plain"):
        assert label in printed
        assert (out / "eval" / label / "report.json").is_file()
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["pretrained", "memmit", "paper", "plain"]
    for r in rows:
        assert 0 <= r["copies_of_duplicated"] + r["copies_of_unique"] <= 1
        assert r["frechet"] is not None and r["frechet"] >= 0
    # memmit ran AGC (skip fractions recorded); the plain arm has AGC off, so it skipped nothing.
    assert rows[1]["skip_duplicated"] is not None and rows[3]["skip_duplicated"] == 0 == rows[3]["skip_unique"]
    # memmit's default trains on one copy of each duplicated digit; the paper and plain arms on all.
    dup = json.loads((out / "memmit" / "memmit" / "duplicates.json").read_text())
    assert dup["num_clusters"] == 8 and dup["largest_cluster"] == 4
    Image.open(out / "compare.png").verify()

    # A second run reuses the cached data, classifier and pretrained pipeline.
    assert main(argv) == 0
    assert "using the cached pretrained pipeline" in capsys.readouterr().out
