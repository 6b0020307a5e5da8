"""The README's "With your own model" section, run as written (issue 12, items 1 to 5):
its Python blocks are written to the files their first-line comment names, and its shell
commands run in that folder (``prepdefense ...`` in-process, ``python -c ...`` in a
subprocess), on a folder of images the README's model labels itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from byo_helpers import forget, label_by_model, noise_images  # noqa: E402
from prepdefense import user_code
from prepdefense.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## With your own model")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks(section: str, lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(block: str):
    return [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_section_runs_as_written(tmp_path, monkeypatch, capsys):
    section = _section()
    files = {}
    for block in _blocks(section, "python"):
        first = block.splitlines()[0]
        assert first.startswith("# ") and first.endswith(".py"), first
        files[first[2:].strip()] = block
    assert set(files) == {"my_net.py", "my_defense.py", "art_attack.py"}
    for name, block in files.items():
        (tmp_path / name).write_text(block)
    commands = [c for block in _blocks(section, "bash") for c in _commands(block)]
    assert [c[0] for c in commands].count("prepdefense") >= 5

    monkeypatch.chdir(tmp_path)
    forget("my_net", "my_defense")
    # Not on sys.path: the working folder is searched for the user's modules.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(tmp_path)]), OMP_NUM_THREADS="1")
    results = []
    try:
        for argv in commands:
            if argv[0] == "python":
                proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr
                continue
            assert argv[0] == "prepdefense", argv
            if not (tmp_path / "my-images" / "labels.csv").exists():
                my_net = user_code.import_module("my_net")  # as the README's commands import it
                noise_images(tmp_path / "my-images", 6, seed=2)
                label_by_model(tmp_path / "my-images", my_net.my_net("my_net.pth").eval())
            state = torch.get_rng_state()
            code = main(argv[1:])
            torch.set_rng_state(state)
            out, err = capsys.readouterr()
            assert code == 0, f"{' '.join(argv)}: exit {code}\n{out}\n{err}"
            results.append((argv, out))
    finally:
        forget("my_net", "my_defense")
    by_command = {(a[1], a[a.index("--model") + 1] if "--model" in a else "", a[a.index("--defense") + 1] if "--defense" in a else ""): o
                  for a, o in results}
    plain = json.loads(by_command[("predict", "my_net:my_net", "")])
    assert plain["accuracy"] == 1.0 and plain["n"] == 6
    assert "contract" in by_command[("check-defense", "", "")] and "FAIL" not in by_command[("check-defense", "", "")]
    attack = json.loads(by_command[("attack", "my_net:my_net", "my_defense:Noise")])
    assert attack["n"] == 4 and attack["l2_rms_max"] <= 0.05 + 1e-4
    scripted = json.loads(by_command[("predict", "torchscript:my_net.pt", "my_defense:Noise")])
    defended = json.loads(by_command[("predict", "my_net:my_net", "fd+my_defense:Noise")])
    assert scripted["n"] == defended["n"] == 6
    judged = json.loads(by_command[("judge", "my_net:my_net", "dct-distort")])  # ART's PGD through the preprocessor
    assert judged["n"] == 6 and judged["draws"] == 10 and judged["linf_max"] <= 8 / 255 + 1e-6
