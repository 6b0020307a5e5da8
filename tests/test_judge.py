"""``prepdefense judge`` (issue 12, item 4): adversarial examples from a file or a folder of
images re-judged on fresh draws of the defended model.

Adversarial examples made by our own attack and re-judged give the attack's own verdict (same
seed, draws and image ids); a folder of 8-bit PNGs is judged as the 1/255 grid it holds and the
report says so; channels-last 8-bit arrays and one-hot labels are read as the NCHW float they
are; bad files and mismatched shapes or labels are one-line usage errors (exit 2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from byo_helpers import TINY_NET, cli, cli_json, forget, write_module  # noqa: E402
from prepdefense import attacks, defenses, models
from prepdefense.attacks.bpda import with_bpda
from prepdefense.attacks.verdict import evaluate_on_draws
from prepdefense.defenses import Defended
from prepdefense.draws import DrawKey, image_id
from prepdefense.experiments.judge import judge, load_adversarial, quantize_8bit
from prepdefense.metrics import l2_rms, linf

NET = "judge_tiny_net"
NAMES = [f"img{i}.png" for i in range(6)]
SEED = 3


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny net on sys.path, 6 images it labels itself, and our PGD's adversarial examples
    through dct-distort (BPDA) with the attack's own verdict on 10 fresh draws."""
    folder = tmp_path_factory.mktemp("judge")
    write_module(folder, NET, TINY_NET)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(folder))
    forget(NET)
    net = models.create(f"{NET}:tiny_net").eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = net(x).argmax(1)
    ids = [image_id(n) for n in NAMES]
    run_key = DrawKey.from_seed(SEED, 6, ids)  # as `prepdefense attack` keys a run
    deployed = Defended(defenses.create("dct-distort"), net)
    adv = attacks.create("pgd", eps=0.2, steps=10)(with_bpda(deployed), x, labels=labels, generator=run_key.child("attack")).adversarial
    verdict = evaluate_on_draws(deployed, adv, labels, None, draws=10, key=run_key.child("judge"))
    yield {"folder": folder, "net": net, "x": x, "labels": labels, "adv": adv, "verdict": verdict}
    mp.undo()
    forget(NET)


def _judge_cli(capsys, adv_path, *extra):
    return cli_json(capsys, "judge", "--adv", str(adv_path), "--model", f"{NET}:tiny_net", "--device", "cpu",
                    "--seed", str(SEED), *extra)


def test_our_attack_rejudged_from_npz_gives_its_own_verdict(made, capsys, tmp_path):
    path = tmp_path / "adv.npz"
    np.savez(path, x_adv=made["adv"].numpy(), labels=made["labels"].numpy(), x=made["x"].numpy(), ids=np.array(NAMES))
    out_file = tmp_path / "report.json"
    got = _judge_cli(capsys, path, "--defense", "dct-distort", "--out", str(out_file))
    v = made["verdict"]
    assert got["draws"] == 10 and got["n"] == 6 and not got["targeted"]
    assert got["accuracy"] == v["robust_accuracy_expected"] and got["asr"] == v["asr_expected"]
    assert got["asr_worst"] == v["asr_worst"] and got["per_image_fooled_fraction"] == v["per_image_fooled_fraction"]
    assert tuple(got["asr_ci95"]) == tuple(v["asr_expected_ci95"])
    assert tuple(got["accuracy_worst_ci95"]) == tuple(v["robust_accuracy_worst_ci95"])
    assert got["asr"] > 0  # the attack did something the verdict can see
    assert got["linf_max"] == pytest.approx(float(linf(made["adv"], made["x"]).max()))
    assert got["l2_rms_mean"] == pytest.approx(float(l2_rms(made["adv"], made["x"]).mean()))
    assert got["bare_accuracy"] == float((made["net"](made["adv"]).argmax(1) == made["labels"]).float().mean())
    assert any("judged as given" in n for n in got["notes"])  # float arrays: not quantised unless asked
    assert json.loads(out_file.read_text())["asr"] == got["asr"]
    # the same from a .pt file of tensors, and from the library
    torch.save({"x_adv": made["adv"], "labels": made["labels"], "ids": torch.tensor([image_id(n) for n in NAMES])}, tmp_path / "adv.pt")
    assert _judge_cli(capsys, tmp_path / "adv.pt", "--defense", "dct-distort")["per_image_fooled_fraction"] == v["per_image_fooled_fraction"]


def test_png_folder_is_judged_as_the_8bit_grid_it_holds(made, capsys, tmp_path):
    adv_dir, clean_dir = tmp_path / "adv", tmp_path / "clean"
    adv_dir.mkdir(), clean_dir.mkdir()
    to8 = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    targets = (made["labels"] + 1) % 10
    for i, name in enumerate(NAMES):
        Image.fromarray(to8(made["adv"][i])).save(adv_dir / name)
        Image.fromarray(to8(made["x"][i])).save(clean_dir / name)
    (adv_dir / "labels.csv").write_text("file,label,target\n" + "".join(
        f"{n},{int(made['labels'][i])},{int(targets[i])}\n" for i, n in enumerate(NAMES)))
    got = _judge_cli(capsys, adv_dir, "--clean", str(clean_dir), "--defense", "dct-distort")
    assert got["format"] == "folder" and got["eight_bit"] and got["targeted"]
    assert any("1/255 grid" in n for n in got["notes"])
    # the same verdict as the quantised arrays, keyed by the file names
    q = quantize_8bit(made["adv"])
    ref = evaluate_on_draws(Defended(defenses.create("dct-distort"), made["net"]), q, made["labels"], targets, draws=10,
                            key=DrawKey.from_seed(SEED, 6, [image_id(n) for n in NAMES]).child("judge"))
    assert got["per_image_fooled_fraction"] == ref["per_image_fooled_fraction"]
    assert got["linf_max"] == pytest.approx(float(linf(q, quantize_8bit(made["x"])).max()), abs=1e-6)
    # --quantize on the float arrays gives the folder's verdict
    np.savez(tmp_path / "adv.npz", x_adv=made["adv"].numpy(), labels=made["labels"].numpy(), targets=targets.numpy(),
             ids=np.array(NAMES))
    quantized = _judge_cli(capsys, tmp_path / "adv.npz", "--defense", "dct-distort", "--quantize")
    assert quantized["per_image_fooled_fraction"] == got["per_image_fooled_fraction"]
    assert any("rounded to 8 bits" in n for n in quantized["notes"])
    code, out, _ = cli(capsys, "judge", "--adv", str(adv_dir), "--defense", "dct-distort", "--model", f"{NET}:tiny_net",
                       "--device", "cpu")
    assert code == 0 and "ASR" in out and "note: 8-bit image files" in out


def test_channels_last_uint8_and_one_hot_labels_are_converted_and_noted(made, tmp_path):
    q = quantize_8bit(made["adv"])
    nhwc = (q.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "a.npz", x_adv=nhwc, labels=np.eye(10, dtype=np.float32)[made["labels"].numpy()])
    np.savez(tmp_path / "b.npz", x_adv=q.numpy(), labels=made["labels"].numpy())
    a, b = load_adversarial(tmp_path / "a.npz"), load_adversarial(tmp_path / "b.npz")
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.labels, b.labels) and a.eight_bit and b.eight_bit
    assert any("channels last" in n for n in a.notes) and any("divided by 255" in n for n in a.notes)
    assert any("one-hot" in n for n in a.notes)
    ra, rb = (judge(made["net"], "rand", s, seed=1) for s in (a, b))
    assert ra["per_image_fooled_fraction"] == rb["per_image_fooled_fraction"] and ra["draws"] == 10
    det = judge(made["net"], "fd", b)  # a deterministic defense is judged once
    assert det["draws"] == 1 and any("deterministic" in n for n in det["notes"])


def test_bad_inputs_are_one_line_usage_errors(made, capsys, tmp_path):
    x, y = made["adv"].numpy(), made["labels"].numpy()
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    (tmp_path / "adv.txt").write_text("x")
    np.savez(tmp_path / "nolabels.npz", x_adv=x)
    np.savez(tmp_path / "short.npz", x_adv=x, labels=y[:4])
    np.savez(tmp_path / "xshape.npz", x_adv=x, labels=y, x=x[:, :, :16])
    np.savez(tmp_path / "range.npz", x_adv=x * 3 + 0.5, labels=y)
    np.savez(tmp_path / "nan.npz", x_adv=np.where(x > 0.5, np.nan, x), labels=y)
    np.savez(tmp_path / "classes.npz", x_adv=x, labels=y + 10)
    np.savez(tmp_path / "sametarget.npz", x_adv=x, labels=y, targets=y)
    np.savez(tmp_path / "size.npz", x_adv=np.zeros((2, 3, 48, 48), np.float32), labels=y[:2])
    np.savez(tmp_path / "one.npz", x_adv=x[0], labels=y[:1])
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "nocsv").mkdir()
    cases = {
        "missing.npz": "not found",
        "junk.npz": "cannot read",
        "adv.txt": "unknown format .txt",
        "nolabels.npz": "has no labels",
        "short.npz": "labels has 4 entries for 6 images",
        "xshape.npz": "the clean images must match",
        "range.npz": "expected float images in [0, 1]",
        "nan.npz": "NaN",
        "classes.npz": "the model has 10 classes",
        "sametarget.npz": "targets equal the true labels",
        "size.npz": "the model takes 32x32",
        "one.npz": "expected a batch",
        "list.pt": "holds a list",
        "nocsv": "has no labels.csv",
    }
    for name, message in cases.items():
        code, out, err = cli(capsys, "judge", "--adv", str(tmp_path / name), "--defense", "fd", "--model", f"{NET}:tiny_net",
                             "--device", "cpu")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert message in err, (name, err)
    np.savez(tmp_path / "ok.npz", x_adv=x, labels=y)
    for argv, message in ((["--draws", "5"], "--draws must be at least 10"), (["--clean", str(tmp_path)], "--clean is for a folder"),
                          (["--defense", "nope"], "unknown defense")):
        base = ["judge", "--adv", str(tmp_path / "ok.npz"), "--model", f"{NET}:tiny_net", "--device", "cpu"]
        code, _, err = cli(capsys, *base, *(argv if "--defense" in argv else ["--defense", "fd", *argv]))
        assert code == 2 and message in err, err
