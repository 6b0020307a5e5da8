"""What a newcomer's review of the CLI found (2026-11-30): an existing output file could not be
written again, a labels.csv could list a file twice, and usability --json gave strings."""

from __future__ import annotations

import pytest

from prepdefense.cli.common import UsageError, check_out_file
from prepdefense.cli.usability import _typed
from prepdefense.data import loading
from prepdefense.errors import DataError


def test_an_existing_output_file_may_be_written_again(tmp_path):
    """Was: a second identical run of attack --save-adv / judge --out / learn-table --out exited
    2 with 'adv.npz is a file, not a folder'."""
    f = tmp_path / "adv.npz"
    f.write_bytes(b"old")
    check_out_file(str(f), "--save-adv")  # replaced atomically by the new result
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_out_file(str(f / "x.json"))
    with pytest.raises(UsageError, match="is a folder"):
        check_out_file(str(tmp_path))


def test_a_file_listed_twice_in_labels_csv_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "img0.png")
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,4\nimg0.png,5\n")
    with pytest.raises(DataError, match=r"row 3: img0.png is listed again \(first at row 2\)"):
        loading.load_dataset(tmp_path, size=32)


def test_usability_json_cells_are_numbers():
    assert _typed("1.000") == 1.0 and _typed("200") == 200 and _typed("-") is None and _typed("fd table") == "fd table"


def test_a_resumed_run_checks_its_cached_images_against_the_data(tmp_path):
    """Was: a resumed evaluate reused its cached sample after an image under --data changed,
    and reported on an image the model no longer classified as cached."""
    import torch
    from PIL import Image

    from prepdefense.experiments.sample_cache import load_or_draw_sample
    from prepdefense.experiments.store import ConfigMismatchError, ResultStore
    from toy_models import TinyConvNet

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    net = TinyConvNet().eval()
    rows = []
    for i in range(6):
        img = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(data / f"img{i}.png")
        rows.append(f"img{i}.png,0")
    (data / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    # label every image with the toy model's own prediction, so that all are "correct"
    x, labels = loading.load_images(str(data), size=32)[:2]
    pred = net(x).argmax(1).tolist()
    (data / "labels.csv").write_text("file,label\n" + "\n".join(f"img{i}.png,{p}" for i, p in enumerate(pred)) + "\n")
    store = ResultStore(tmp_path / "run").open()
    first = load_or_draw_sample(store, net, str(data), 3, 0, torch.device("cpu"))
    again = load_or_draw_sample(store, net, str(data), 3, 0, torch.device("cpu"))  # unchanged data: resumes
    assert torch.equal(first.x, again.x) and list(first.ids) == list(again.ids)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(data / first.ids[1])  # the same name, other pixels
    with pytest.raises(ConfigMismatchError, match=f"changed since this run.*{first.ids[1]} has other pixels"):
        load_or_draw_sample(store, net, str(data), 3, 0, torch.device("cpu"))
    (data / first.ids[1]).unlink()
    with pytest.raises(ConfigMismatchError, match="no longer"):
        load_or_draw_sample(store, net, str(data), 3, 0, torch.device("cpu"))


def test_evaluate_json_keeps_its_log_lines_on_stderr(capsys, monkeypatch, tmp_path):
    """Was: with --json and stderr not a terminal, the log lines went to /dev/null, so
    `--json > card.json 2> run.log` left an empty log."""
    import json

    from byo_helpers import tiny_convnet_folder
    from prepdefense.cli.main import main

    data = tiny_convnet_folder(tmp_path / "data", 4, seed=0)
    code = main(["evaluate", "--data", str(data), "--defense", "bdr", "--norm", "linf", "--n", "2", "--budget", "quick", "--model", "toy_models:tiny_convnet",
                 "--device", "cpu", "--json", "--out", str(tmp_path / "ev"), "--no-checks", "--no-curve"])
    out, err = capsys.readouterr()
    assert code == 0, err
    json.loads(out)  # stdout holds the card alone
    assert "evaluate" in err  # the log lines


def test_a_resumed_run_whose_data_is_gone_resumes_from_the_cache_with_a_warning(tmp_path):
    import shutil

    import torch

    from byo_helpers import tiny_convnet_folder
    from prepdefense.experiments.sample_cache import load_or_draw_sample
    from prepdefense.experiments.store import ResultStore
    from toy_models import TinyConvNet

    data = tiny_convnet_folder(tmp_path / "data", 4, seed=0)
    store = ResultStore(tmp_path / "run").open()
    first = load_or_draw_sample(store, TinyConvNet().eval(), str(data), 2, 0, torch.device("cpu"))
    shutil.rmtree(data)
    with pytest.warns(UserWarning, match="not there to check"):
        again = load_or_draw_sample(store, TinyConvNet().eval(), str(data), 2, 0, torch.device("cpu"))
    assert torch.equal(first.x, again.x)


def test_spsa_with_its_diagnostics_runs(tmp_path, capsys):
    """Was (briefly, in this session's first version): SPSA's steps default None broke the
    doubled-steps check; a run with --steps and --queries is a usage error instead."""
    from byo_helpers import tiny_convnet_folder
    from prepdefense.cli.main import main

    data = tiny_convnet_folder(tmp_path / "data", 3, seed=1)
    common = ["attack", "--model", "toy_models:tiny_convnet", "--device", "cpu", "--data", str(data), "--defense", "none",
              "--attack", "spsa", "--n", "2", "--samples", "2", "--diagnostics", "full", "--json"]
    assert main([*common, "--queries", "8"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*common, "--queries", "8", "--steps", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_attack_warns_that_eot_does_nothing_on_a_deterministic_defense(tmp_path, capsys):
    """EOT over a deterministic defense calls it once: --eot N and --eot-chunk cost nothing and
    change nothing, which a user who asked for them should be told; on a random defense, no word."""
    from byo_helpers import tiny_convnet_folder
    from prepdefense.cli.main import main

    data = tiny_convnet_folder(tmp_path / "data", 3, seed=1)
    common = ["attack", "--model", "toy_models:tiny_convnet", "--device", "cpu", "--data", str(data), "--n", "2",
              "--attack", "pgd", "--steps", "1", "--norm", "linf", "--eps", "0.03", "--untargeted", "--json"]
    assert main([*common, "--defense", "jpeg", "--eot", "3", "--eot-chunk", "2"]) == 0
    err = capsys.readouterr().err
    assert "--eot and --eot-chunk change nothing here" in err and "--defense jpeg is deterministic" in err
    assert main([*common, "--defense", "jpeg"]) == 0
    assert "change nothing" not in capsys.readouterr().err
    assert main([*common, "--defense", "rand", "--eot", "3", "--draws", "10"]) == 0
    assert "change nothing" not in capsys.readouterr().err
